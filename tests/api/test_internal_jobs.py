"""The running jobs' routes (`/internal/jobs/{job_key}/...`, corral.routes.internal_jobs)
on both database backends: a job's token opens its own job's routes and nothing else
(job A's token reads and writes nothing of job B's, on every route), no API key opens
them and a job token opens no other route; bad bodies are refused with a 4xx and change
nothing stored, and fuzzed ones never get a 5xx (the routes are not in the OpenAPI
document, so tests/api/test_fuzz.py does not reach them: they are fuzzed here, and
tests/api/test_tenant_matrix.py lists them as job-token routes checked here). The job's
side, `HttpTransport`, reports a whole run through them, retries while the API does not
answer (across a real restart on the same port) and gives up at once on a refusal."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.api.internal_jobs import MAX_JOB_KEY_CHARS
from corral.app import create_app
from corral.config import Settings
from corral.job_tokens import TOKEN_PREFIX, JobTokens
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.store.tables import JOB_KEY_LENGTH
from corral.tenancy import job_key
from jobs.reporting import JobReporter
from jobs.transport import HttpTransport, ReportRefused, ReportUnavailable
from tests.api.conftest import ALPHA

pytestmark = pytest.mark.integration

A_KEY, B_KEY = job_key("alpha", "job-a"), job_key("beta", "job-b")


@pytest.fixture
def tokens(settings: Settings) -> JobTokens:
    """Under the app's own secret (the one under its home)."""
    return JobTokens.from_settings(settings)


@pytest.fixture
def jobs(database: Database, tmp_path: Path) -> dict[str, Path]:
    """Job A (alpha's) and job B (beta's), each with its own directory; their roots."""
    roots = {}
    for tenant, uuid in (("alpha", "job-a"), ("beta", "job-b")):
        root = tmp_path / "storage" / tenant / uuid
        root.mkdir(parents=True)
        with database.transaction() as session:
            JobStore(session).create(
                job_uuid=uuid,
                tenant=tenant,
                kind=JobKind.SUPERVISED_FINE_TUNE,
                request={"logger_config": {}},
                launch={"output_dir": str(root), "n_epochs": 1},
            )
        roots[job_key(tenant, uuid)] = root
    return roots


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _call(
    client: TestClient, method: str, key: str, route: str, body: Any, headers: Any
) -> httpx.Response:
    return client.request(method, f"/internal/jobs/{key}/{route}", json=body, headers=headers)


def _http(token: str, *, retry_s: float = 60, **answers: Any) -> HttpTransport:
    """A transport of job A's over a scripted client (see `_scripted`)."""
    return HttpTransport("http://api", A_KEY, token=token, retry_s=retry_s, **answers)


def _snapshot(database: Database, key: str) -> tuple[Any, ...]:
    """Everything a job's routes can change of its row."""
    with database.transaction() as session:
        store = JobStore(session)
        job = store.by_key(key)
        return (
            job.status,
            job.error,
            job.resources_allocated,
            job.total_steps,
            job.started_at,
            [line.line for line in store.log_lines(key)],
            [(m.step, m.epoch, m.values) for m in store.metrics(key)],
            [(c.iters, c.path, c.metrics) for c in store.checkpoints(key)],
        )


def _routes(root: Path) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Every internal route, each with a body its job would be answered 2xx for."""
    return [
        ("GET", "launch", None),
        ("GET", "status", None),
        ("GET", "checkpoints", None),
        ("POST", "transition", {"to": "running", "resources_allocated": {"num_workers": 2}}),
        ("POST", "logs", {"lines": ["step 1 loss 2.0"]}),
        ("POST", "plan", {"total_steps": 4, "detail": "1 epoch"}),
        ("POST", "metrics", {"step": 1, "epoch": 1, "values": {"loss": 2.0}}),
        ("POST", "checkpoints", {"iters": 1, "path": str(root / "checkpoints" / "iter-1")}),
        ("POST", "dataset", {"row_count": 1, "content_sha256": "0" * 64}),
    ]


def test_a_jobs_token_opens_none_of_another_jobs_routes(
    client: TestClient, database: Database, tokens: JobTokens, jobs: dict[str, Path]
) -> None:
    before = _snapshot(database, B_KEY)
    for method, route, body in _routes(jobs[B_KEY]):
        answer = client.request(
            method,
            f"/internal/jobs/{B_KEY}/{route}",
            json=body,
            headers=_bearer(tokens.token_for(A_KEY)),
        )
        assert answer.status_code == 401, (route, answer.text)
        assert answer.json()["error"]["code"] == "unauthorized"
        assert B_KEY not in answer.text and "job-b" not in answer.text
    assert _snapshot(database, B_KEY) == before

    # The same calls with B's own token are B's to make (a training job registers no
    # dataset: 422).
    for method, route, body in _routes(jobs[B_KEY]):
        answer = client.request(
            method,
            f"/internal/jobs/{B_KEY}/{route}",
            json=body,
            headers=_bearer(tokens.token_for(B_KEY)),
        )
        assert answer.status_code == (
            422 if route == "dataset" else 200 if method == "GET" or route == "transition" else 204
        ), (route, answer.text)
    assert _snapshot(database, B_KEY) != before


AUTHORIZATIONS: list[str | bytes | None] = [
    None,
    "",
    "Bearer",
    "Bearer ",
    f"Bearer {TOKEN_PREFIX}garbage",
    "Bearer key-alpha",  # an API key is not a job token
    "Basic a2V5LWFscGhhOg==",
    "Bearer \u00e9\u00e9".encode("latin-1"),
]


def test_no_token_a_garbage_token_or_an_api_key_is_401_on_every_route(
    client: TestClient, database: Database, jobs: dict[str, Path]
) -> None:
    before = _snapshot(database, A_KEY)
    for authorization in AUTHORIZATIONS:
        headers = {"Authorization": authorization} if authorization is not None else {}
        for method, route, body in _routes(jobs[A_KEY]):
            answer = _call(client, method, A_KEY, route, body, headers)
            assert answer.status_code == 401, (authorization, route, answer.text)
    assert _snapshot(database, A_KEY) == before


def test_a_token_is_checked_before_the_body_is_read(
    client: TestClient, database: Database, jobs: dict[str, Path]
) -> None:
    for content in (b"{not json", b"[" * 100_000, json.dumps({"lines": ["x" * 10**6]}).encode()):
        answer = client.post(
            f"/internal/jobs/{A_KEY}/logs",
            content=content,
            headers={"Content-Type": "application/json", **ALPHA},
        )
        assert answer.status_code == 401, answer.text


def test_without_api_keys_the_internal_routes_still_need_the_jobs_token(
    tmp_path: Path, database: Database, jobs: dict[str, Path]
) -> None:
    open_settings = Settings(home=tmp_path / "open-home")  # no keys: the local default
    app = create_app(open_settings, database=database)
    token = JobTokens.from_settings(open_settings).token_for(A_KEY)
    with TestClient(app) as open_client:
        assert open_client.get("/post_training/jobs").status_code == 200  # open, as before
        assert open_client.get(f"/internal/jobs/{A_KEY}/status").status_code == 401
        answer = open_client.get(f"/internal/jobs/{A_KEY}/status", headers=_bearer(token))
        assert answer.status_code == 200
        assert answer.json() == {"status": "scheduled", "attempt": 0}


def test_a_job_token_opens_no_other_route(
    client: TestClient, tokens: JobTokens, jobs: dict[str, Path]
) -> None:
    headers = _bearer(tokens.token_for(A_KEY))
    for method, path in [
        ("GET", "/post_training/jobs"),
        ("GET", "/jobs"),
        ("GET", "/jobs/job-a/logs"),
        ("GET", "/models/list"),
    ]:
        assert client.request(method, path, headers=headers).status_code == 401, path
    assert client.get("/post_training/jobs", headers=ALPHA).status_code == 200


def test_a_token_names_one_key_and_changes_with_the_secret() -> None:
    first, second = JobTokens(b"a" * 32), JobTokens(b"b" * 32)
    assert first.token_for(A_KEY).startswith(TOKEN_PREFIX)
    assert first.verify(A_KEY, first.token_for(A_KEY))
    assert not first.verify(B_KEY, first.token_for(A_KEY))
    assert not second.verify(A_KEY, first.token_for(A_KEY))  # a new secret: old tokens fail
    assert not first.verify(A_KEY, "")
    with pytest.raises(ValueError, match="at least 32"):
        JobTokens(b"short").token_for(A_KEY)


def test_the_secret_is_made_once_private_and_kept(tmp_path: Path) -> None:
    home = tmp_path / "home"
    made = JobTokens.from_settings(Settings(home=home)).token_for(A_KEY)
    secret_file = home / "job_token_secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert JobTokens.from_settings(Settings(home=home)).token_for(A_KEY) == made
    assert [p.name for p in home.iterdir()] == ["job_token_secret"]  # no temporary left
    configured = Settings(home=home, job_token_secret="x" * 40)
    assert JobTokens.from_settings(configured).token_for(A_KEY) != made
    with pytest.raises(ValueError, match="at least 32"):
        Settings(home=home, job_token_secret="short")


def test_racing_processes_agree_on_one_secret(tmp_path: Path) -> None:
    from corral.job_tokens import load_or_create_secret

    path = tmp_path / "secret"
    found: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: found.append(load_or_create_secret(path))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == 1 and found[0] == path.read_text().strip().encode()


def test_a_cancelled_job_cannot_complete_itself_through_the_routes(
    client: TestClient, database: Database, tokens: JobTokens, jobs: dict[str, Path]
) -> None:
    headers = _bearer(tokens.token_for(A_KEY))
    started = client.post(
        f"/internal/jobs/{A_KEY}/transition", json={"to": "running"}, headers=headers
    )
    assert started.json() == {"applied": True, "status": "running", "refused": None}
    assert client.post("/jobs/job-a/cancel", headers=ALPHA).status_code == 200
    completed = client.post(
        f"/internal/jobs/{A_KEY}/transition", json={"to": "completed"}, headers=headers
    )
    assert completed.status_code == 200
    assert completed.json() == {"applied": False, "status": "cancelled", "refused": "illegal"}
    # Only the moves a job makes itself: the server schedules and cancels.
    for to in ("scheduled", "cancelled"):
        answer = client.post(f"/internal/jobs/{A_KEY}/transition", json={"to": to}, headers=headers)
        assert answer.status_code == 422, answer.text
    status = client.get(f"/internal/jobs/{A_KEY}/status", headers=headers).json()
    assert status["status"] == "cancelled"


def test_a_checkpoint_outside_the_jobs_own_directory_is_refused(
    client: TestClient, database: Database, tokens: JobTokens, jobs: dict[str, Path], tmp_path: Path
) -> None:
    headers = _bearer(tokens.token_for(A_KEY))
    own = jobs[A_KEY]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (own / "link").symlink_to(outside)
    before = _snapshot(database, A_KEY)
    for path, status in [
        (str(jobs[B_KEY] / "checkpoints" / "iter-1"), 403),  # another job's (another tenant's)
        (str(own.parent / "job-a-other" / "iter-1"), 403),  # a sibling that starts alike
        (str(outside / "iter-1"), 403),
        (str(own / "link" / "iter-1"), 403),  # inside as written, outside once resolved
        (f"{own}/../job-b/iter-1", 422),
        (f"file://{own}/%2e%2e/x", 422),  # a URL: its escapes are decoded first
        ("s3://bucket/alpha/job-a/iter-1", 403),
        ("relative/iter-1", 422),
        ("", 422),
    ]:
        answer = client.post(
            f"/internal/jobs/{A_KEY}/checkpoints", json={"iters": 1, "path": path}, headers=headers
        )
        assert answer.status_code == status, (path, answer.text)
    assert _snapshot(database, A_KEY) == before

    good = str(own / "checkpoints" / "iter-1")
    for _ in range(2):  # a retried report is recorded once
        answer = client.post(
            f"/internal/jobs/{A_KEY}/checkpoints", json={"iters": 1, "path": good}, headers=headers
        )
        assert answer.status_code == 204, answer.text
    other = client.post(
        f"/internal/jobs/{A_KEY}/checkpoints",
        json={"iters": 1, "path": str(own / "checkpoints" / "again")},
        headers=headers,
    )
    assert other.status_code == 409
    listed = client.get(f"/internal/jobs/{A_KEY}/checkpoints", headers=headers).json()
    assert listed == {"checkpoints": [{"iters": 1, "path": good}]}


BAD_BODIES: list[tuple[str, Any, int]] = [
    ("logs", {"lines": []}, 422),
    ("logs", {"lines": ["x"] * 513}, 422),
    ("logs", {"lines": ["x" * 8193]}, 422),
    ("logs", {"lines": ["a\u0000b"]}, 422),
    ("logs", {"lines": "not a list"}, 422),
    ("logs", {"lines": ["ok"], "extra": 1}, 422),
    ("metrics", {"step": 1, "values": {"bad name!": 1.0}}, 422),
    ("metrics", {"step": 1, "values": {"x" * 101: 1.0}}, 422),
    ("metrics", {"step": 1, "values": {f"m{i}": 1.0 for i in range(65)}}, 422),
    ("metrics", {"step": -1, "values": {"loss": 1.0}}, 422),
    ("metrics", {"step": 2**31, "values": {"loss": 1.0}}, 422),
    ("metrics", {"step": 1, "values": {"loss": "NaN"}}, 422),
    ("plan", {"total_steps": -1}, 422),
    ("plan", {"total_steps": 1, "detail": "x" * 1001}, 422),
    ("transition", {"to": "running", "error": "x" * 8193}, 422),
    ("transition", {"to": "running", "resources_allocated": {"n": {"nested": 1}}}, 422),
    ("checkpoints", {"iters": 1, "path": "/" + "x" * 4096}, 422),
    ("checkpoints", {"iters": 1, "path": "/x", "metrics": {"loss": "inf"}}, 422),
    ("dataset", {"row_count": 1, "content_sha256": "nothex"}, 422),
]


def test_bad_bodies_are_refused_and_change_nothing(
    client: TestClient, database: Database, tokens: JobTokens, jobs: dict[str, Path]
) -> None:
    before = _snapshot(database, A_KEY)
    for route, body, status in BAD_BODIES:
        answer = _call(client, "POST", A_KEY, route, body, _bearer(tokens.token_for(A_KEY)))
        assert answer.status_code == status, (route, body, answer.text)
        assert answer.json()["error"]["code"] == "validation_error"
    assert _snapshot(database, A_KEY) == before


def test_an_oversize_body_is_413_and_nested_or_broken_json_422(
    client: TestClient, database: Database, tokens: JobTokens, jobs: dict[str, Path]
) -> None:
    headers = {"Content-Type": "application/json", **_bearer(tokens.token_for(A_KEY))}
    before = _snapshot(database, A_KEY)
    huge = json.dumps({"lines": ["x" * 8000] * 1100}).encode()  # past 8 MiB
    answer = client.post(f"/internal/jobs/{A_KEY}/logs", content=huge, headers=headers)
    assert answer.status_code == 413, answer.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(9):
            yield b" " * (1 << 20)

    answer = client.post(f"/internal/jobs/{A_KEY}/logs", content=chunks(), headers=headers)
    assert answer.status_code == 413, answer.text
    for content in (b"[" * 100_000 + b"]" * 100_000, b"{not json", b'{"lines": ["\\ud800"]}'):
        answer = client.post(f"/internal/jobs/{A_KEY}/logs", content=content, headers=headers)
        assert answer.status_code == 422, answer.text
    assert _snapshot(database, A_KEY) == before


def test_an_unknown_job_is_404_to_its_own_token(client: TestClient, tokens: JobTokens) -> None:
    key = job_key("alpha", "never")
    answer = client.get(f"/internal/jobs/{key}/status", headers=_bearer(tokens.token_for(key)))
    assert answer.status_code == 404


def test_a_key_as_long_as_the_store_allows_fits_the_route() -> None:
    assert MAX_JOB_KEY_CHARS == JOB_KEY_LENGTH


def test_the_internal_routes_are_not_in_the_openapi_document(client: TestClient) -> None:
    document = client.get("/openapi.json", headers=ALPHA).json()
    assert not [path for path in document["paths"] if path.startswith("/internal")]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "lines",
        "step",
        "epoch",
        "values",
        "to",
        "error",
        "resources_allocated",
        "total_steps",
        "detail",
        "iters",
        "path",
        "metrics",
        "row_count",
        "content_sha256",
    ]
)


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_fuzzed_bodies_never_get_a_server_error(
    client: TestClient, database: Database, tokens: JobTokens, jobs: dict[str, Path]
) -> None:
    headers = {"Content-Type": "application/json", **_bearer(tokens.token_for(A_KEY))}

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        route=st.sampled_from(["transition", "logs", "plan", "metrics", "checkpoints", "dataset"]),
        body=st.dictionaries(FIELDS, JSON_VALUES, max_size=4) | JSON_VALUES,
    )
    def check(route: str, body: Any) -> None:
        content = json.dumps(body).encode()  # NaN and Infinity as Python writes them
        answer = client.post(f"/internal/jobs/{A_KEY}/{route}", content=content, headers=headers)
        assert answer.status_code < 500, (route, body, answer.text)

    check()


# ------------------------------------------------------------------ the job's side


def test_a_whole_run_reports_over_http(
    client: TestClient, database: Database, tokens: JobTokens, jobs: dict[str, Path]
) -> None:
    transport = HttpTransport(
        "http://testserver", A_KEY, token=tokens.token_for(A_KEY), retry_s=5, client=client
    )
    reporter = JobReporter(transport)
    assert transport.launch().launch["n_epochs"] == 1
    assert reporter.started(resources_allocated={"num_workers": 2, "use_gpu": False}).applied
    reporter.plan(total_steps=2, detail="1 epoch of 2")
    reporter.log("a\u0000b", "x" * 10_000, *[f"line {i}" for i in range(600)])
    reporter.metrics(step=1, epoch=1, loss=2.0, tokens_per_second=float("nan"))
    path = str(jobs[A_KEY] / "checkpoints" / "iter-1")
    reporter.checkpoint(iters=1, path=path, metrics={"loss": 2.0, "skipped": float("inf")})
    assert reporter.last_checkpoint_path() == path
    state = reporter.state()
    assert state is not None and (state.status, state.attempt) == (JobStatus.RUNNING, 0)
    assert reporter.completed().applied
    status, _, resources, total, _, lines, metrics, checkpoints = _snapshot(database, A_KEY)
    assert status == "completed" and resources == {"num_workers": 2, "use_gpu": False}
    assert total == 2
    assert lines[0] == "plan: 2 steps (1 epoch of 2)"
    assert lines[1] == "a\ufffdb" and len(lines[2]) == 8192 and lines[2].endswith("…")
    assert len(lines) == 603
    assert metrics == [(1, 1, {"loss": 2.0})]
    assert checkpoints == [(1, path, {"loss": 2.0})]
    with pytest.raises(ReportRefused) as refused:  # someone else's job: refused, not retried
        HttpTransport(
            "http://testserver", B_KEY, token=tokens.token_for(A_KEY), retry_s=5, client=client
        ).log(["x"])
    assert refused.value.status_code == 401


def _scripted(answers: list[Any]) -> tuple[httpx.Client, list[httpx.Request]]:
    """A client whose calls get `answers` in turn: a status and JSON body, or an
    exception to raise (a connection error)."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        return httpx.Response(status, json=body)

    return httpx.Client(transport=httpx.MockTransport(handle)), seen


def test_the_transport_retries_what_meets_no_answer_and_not_a_refusal() -> None:
    client, seen = _scripted(
        [
            httpx.ConnectError("refused"),
            (503, {"error": {"code": "x", "message": "restarting"}}),
            (429, {}),
            (204, None),
        ]
    )
    slept: list[float] = []
    transport = HttpTransport(
        "http://api", A_KEY, token="t", retry_s=60, client=client, sleep=slept.append
    )
    transport.log(["hello"])
    assert len(seen) == 4 and slept == [0.5, 1.0, 2.0]
    assert seen[0].headers["authorization"] == "Bearer t"
    assert seen[0].url.path == f"/internal/jobs/{A_KEY}/logs"

    client, seen = _scripted([(422, {"error": {"code": "validation_error", "message": "no"}})])
    transport = HttpTransport(
        "http://api", A_KEY, token="t", retry_s=60, client=client, sleep=slept.append
    )
    with pytest.raises(ReportRefused, match="no"):
        transport.log(["x"])
    assert len(seen) == 1

    client, seen = _scripted([httpx.ConnectError("down")] * 100)
    transport = HttpTransport(
        "http://api", A_KEY, token="t", retry_s=3, client=client, sleep=lambda s: None
    )
    with pytest.raises(ReportUnavailable, match="no answer from the API in 3 s"):
        transport.log(["x"])


def test_a_move_whose_answer_was_lost_counts_as_made() -> None:
    """The first try was applied and its answer lost (a 502 from a proxy): the retry is
    refused as illegal, and the row shows the move made, so it was."""
    client, _ = _scripted(
        [(502, {}), (200, {"applied": False, "status": "running", "refused": "illegal"})]
    )
    transport = HttpTransport(
        "http://api", A_KEY, token="t", retry_s=60, client=client, sleep=lambda s: None
    )
    assert transport.transition(JobStatus.RUNNING).applied
    client, _ = _scripted([(200, {"applied": False, "status": "cancelled", "refused": "illegal"})])
    transport = _http("t", client=client)
    assert not transport.transition(JobStatus.COMPLETED).applied


def _serve_on(app: Any, port: int) -> tuple[uvicorn.Server, threading.Thread, socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return server, thread, sock


def _stop(served: tuple[uvicorn.Server, threading.Thread, socket.socket]) -> None:
    server, thread, sock = served
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_a_report_outlives_an_api_restart_on_the_same_port(
    settings: Settings, database: Database, tokens: JobTokens, jobs: dict[str, Path]
) -> None:
    first = _serve_on(create_app(settings, database=database), 0)
    port = first[2].getsockname()[1]
    transport = HttpTransport(
        f"http://127.0.0.1:{port}", A_KEY, token=tokens.token_for(A_KEY), retry_s=60
    )
    transport.log(["before"])
    _stop(first)
    done = threading.Event()
    reporting = threading.Thread(target=lambda: (transport.log(["during"]), done.set()))
    reporting.start()
    time.sleep(1.5)  # the call meets a closed port and retries
    assert not done.is_set()
    second = _serve_on(create_app(settings, database=database), port)
    try:
        assert done.wait(30), "the report did not arrive after the restart"
        reporting.join()
    finally:
        _stop(second)
        transport.close()
    assert _snapshot(database, A_KEY)[5] == ["before", "during"]
