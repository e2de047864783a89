"""The datasets API end to end over HTTP, on both database backends."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.storage import Storage
from corral.tenancy import tenant_dir
from tests.api.conftest import ALPHA, BETA

pytestmark = pytest.mark.integration

DIALOG_ROWS = [
    {
        "dialog": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        "score": 0.5,
    },
    {
        "dialog": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        "score": 1,
    },
]
COLUMNS = {"dialog": "dialog", "score": "number"}


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def create(client: TestClient, uuid: str, dataset: dict[str, Any], headers: dict[str, str] = ALPHA):
    return client.post("/datasets/create", json={"uuid": uuid, "dataset": dataset}, headers=headers)


def get(client: TestClient, uuid: str, headers: dict[str, str] = ALPHA):
    return client.get("/datasets/get", params={"dataset_id": uuid}, headers=headers)


@pytest.fixture
def jsonl_file(dataset_root: Path) -> Path:
    path = dataset_root / "chat.jsonl"
    path.write_text(jsonl(DIALOG_ROWS))
    return path


def file_dataset(path: Path, **extra: Any) -> dict[str, Any]:
    return {"columns": COLUMNS, "content_url": path.as_uri(), "metadata": {}} | extra


def test_create_get_delete(client: TestClient, jsonl_file: Path) -> None:
    dataset = file_dataset(jsonl_file, metadata={"source": "unit test", "n": 2})
    response = create(client, "chat", dataset)
    assert response.status_code == 200, response.text
    assert response.content == b""
    assert get(client, "chat").json() == dataset
    deleted = client.delete("/datasets/delete", params={"dataset_id": "chat"}, headers=ALPHA)
    assert deleted.status_code == 200
    assert get(client, "chat").status_code == 404
    again = client.delete("/datasets/delete", params={"dataset_id": "chat"}, headers=ALPHA)
    assert again.status_code == 404


def test_create_is_idempotent_and_conflicts_on_a_different_body(
    client: TestClient, jsonl_file: Path
) -> None:
    dataset = file_dataset(jsonl_file)
    assert create(client, "chat", dataset).status_code == 200
    assert create(client, "chat", dataset).status_code == 200
    changed = create(client, "chat", file_dataset(jsonl_file, metadata={"v": 2}))
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "conflict"
    assert get(client, "chat").json() == dataset


@pytest.mark.parametrize(
    ("media_type", "payload"),
    [
        ("application/jsonl", jsonl(DIALOG_ROWS)),
        ("application/json", json.dumps(DIALOG_ROWS)),
        (
            "text/csv",
            "dialog,score\n"
            + "".join(
                '"' + json.dumps(r["dialog"]).replace('"', '""') + f'",{r["score"]}\n'
                for r in DIALOG_ROWS
            ),
        ),
    ],
)
def test_data_urls_in_each_text_format(client: TestClient, media_type: str, payload: str) -> None:
    url = f"data:{media_type};base64,{base64.b64encode(payload.encode()).decode()}"
    dataset = {"columns": COLUMNS, "content_url": url, "metadata": {}}
    response = create(client, "inline", dataset)
    assert response.status_code == 200, response.text
    assert get(client, "inline").json()["content_url"] == url


def test_parquet_file(client: TestClient, dataset_root: Path) -> None:
    table = pa.Table.from_pylist([{"text": "a", "n": 1.5}, {"text": "b", "n": 2.0}])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    path = dataset_root / "t.parquet"
    path.write_bytes(buffer.getvalue())
    dataset = {
        "columns": {"text": "text", "n": "number"},
        "content_url": path.as_uri(),
        "metadata": {},
    }
    assert create(client, "pq", dataset).status_code == 200


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("outside-root", "outside the allowed directories"),
        ("traversal", "outside the allowed directories"),
        ("missing-column", "no column 'score'"),
        ("wrong-type", "expected a number"),
        ("metadata-address", "169.254.169.254"),
        ("loopback", "127.0.0.1"),
        ("plain-http", "http"),
        ("ftp", "content_url"),
        ("empty", "no rows"),
        ("bad-uuid", "dataset uuid"),
    ],
)
def test_bad_datasets_are_refused_and_nothing_is_stored(
    client: TestClient, dataset_root: Path, jsonl_file: Path, case: str, message: str
) -> None:
    uuid = "bad"
    dataset = file_dataset(jsonl_file)
    if case == "outside-root":
        dataset["content_url"] = "file:///etc/passwd"
    elif case == "traversal":
        dataset["content_url"] = f"file://{dataset_root}/../../../etc/passwd"
    elif case == "missing-column":
        (dataset_root / "partial.jsonl").write_text(jsonl([{"dialog": DIALOG_ROWS[0]["dialog"]}]))
        dataset["content_url"] = (dataset_root / "partial.jsonl").as_uri()
    elif case == "wrong-type":
        (dataset_root / "typed.jsonl").write_text(jsonl([DIALOG_ROWS[0] | {"score": "high"}]))
        dataset["content_url"] = (dataset_root / "typed.jsonl").as_uri()
    elif case == "metadata-address":
        dataset["content_url"] = "https://169.254.169.254/latest/meta-data/"
    elif case == "loopback":
        dataset["content_url"] = "https://127.0.0.1:8321/datasets.jsonl"
    elif case == "plain-http":
        dataset["content_url"] = "http://example.com/data.jsonl"
    elif case == "ftp":
        dataset["content_url"] = "ftp://example.com/x"
    elif case == "empty":
        (dataset_root / "empty.jsonl").write_text("")
        dataset["content_url"] = (dataset_root / "empty.jsonl").as_uri()
    elif case == "bad-uuid":
        uuid = "../etc"
    response = create(client, uuid, dataset)
    assert response.status_code == 422, response.text
    assert message.lower() in response.json()["error"]["message"].lower()
    assert get(client, uuid).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"uuid": "x"},
        {
            "uuid": "x",
            "dataset": {"columns": {"a": "video"}, "content_url": "data:,x", "metadata": {}},
        },
        {"uuid": "x", "dataset": {"columns": {}, "content_url": "gopher://x", "metadata": {}}},
        {
            "uuid": "x",
            "dataset": {"columns": {}, "content_url": "data:,x", "metadata": {}, "extra": 1},
        },
        {"uuid": 5, "dataset": {"columns": {}, "content_url": "data:,x", "metadata": {}}},
    ],
    ids=["no-dataset", "bad-column-type", "bad-url-scheme", "extra-field", "uuid-not-string"],
)
def test_malformed_bodies_get_422(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/datasets/create", json=body, headers=ALPHA)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["problems"]


def test_non_json_body_gets_422(client: TestClient) -> None:
    response = client.post(
        "/datasets/create",
        content=b"{not json",
        headers=ALPHA | {"content-type": "application/json"},
    )
    assert response.status_code == 422


def test_get_requires_dataset_id(client: TestClient) -> None:
    assert client.get("/datasets/get", headers=ALPHA).status_code == 422


def test_tenants_do_not_see_each_other(
    client: TestClient, jsonl_file: Path, shared_dataset_root: Path
) -> None:
    dataset = file_dataset(jsonl_file)
    assert create(client, "chat", dataset).status_code == 200
    assert get(client, "chat", headers=BETA).status_code == 404
    deleted = client.delete("/datasets/delete", params={"dataset_id": "chat"}, headers=BETA)
    assert deleted.status_code == 404
    # The same uuid is free for another tenant, with its own body (and its own file).
    beta_file = tenant_dir(shared_dataset_root, "beta") / jsonl_file.name
    beta_file.parent.mkdir()
    beta_file.write_bytes(jsonl_file.read_bytes())
    other = file_dataset(beta_file, metadata={"team": "beta"})
    assert create(client, "chat", other, headers=BETA).status_code == 200
    assert get(client, "chat", headers=BETA).json() == other
    assert get(client, "chat").json() == dataset


def test_a_file_in_job_storage_is_read_for_its_own_tenant_only(
    client: TestClient, settings: Settings
) -> None:
    """Where generation jobs write their datasets: under the storage root, by tenant."""
    storage = Storage.from_settings(settings)
    alpha_file = Path(storage.job_uri("alpha", "gen-1").removeprefix("file://")) / "data.jsonl"
    beta_file = Path(storage.job_uri("beta", "gen-2").removeprefix("file://")) / "data.jsonl"
    for path in (alpha_file, beta_file):
        path.parent.mkdir(parents=True)
        path.write_text(jsonl(DIALOG_ROWS))

    assert create(client, "generated", file_dataset(alpha_file)).status_code == 200
    refused = create(client, "theirs", file_dataset(beta_file))
    assert refused.status_code == 422
    assert "outside your own part" in refused.text
    # `..` out of alpha's own part, spelt plainly and percent-escaped, is refused too
    # (by the fetcher: such a URL names no storage location)
    sneaky = (
        alpha_file.parent.as_uri()
        + "/../../"
        + beta_file.relative_to(alpha_file.parents[2]).as_posix()
    )
    for url in (sneaky, sneaky.replace("..", "%2e%2e")):
        response = create(client, "sneaky", file_dataset(alpha_file, content_url=url))
        assert response.status_code == 422, url
        assert "outside the allowed directories" in response.text
    missing = create(client, "missing", file_dataset(alpha_file.with_name("none.jsonl")))
    assert missing.status_code == 422 and "does not exist" in missing.text
    # A link from alpha's part into beta's is judged by where it leads.
    link = alpha_file.with_name("link.jsonl")
    link.symlink_to(beta_file)
    assert create(client, "linked", file_dataset(link)).status_code == 422
    assert get(client, "theirs").status_code == 404
