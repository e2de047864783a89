"""The operators' routes and what every request leaves behind (corral.routes.ops,
corral.observability): /health and /ready open, /metrics for operator keys only, request
metrics by route template, job gauges from the store, generated tokens, request ids on
responses and in JSON log lines. No Ray: a fake model handle stands in for a Serve app
(tests/api/test_inference_api.py counts tokens through real ones)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from corral.app import create_app
from corral.config import Settings
from corral.errors import NotFound
from corral.observability.logs import log_handler
from corral.ray_jobs import RayJobInfo
from corral.services.readiness import Readiness, build_readiness
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from serve_apps.engines.protocol import GenerationRequest, GenerationResult, StopReason

TENANT = {"Authorization": "Bearer key-alpha"}
OPERATOR = {"Authorization": "Bearer key-ops"}
SAMPLING = {"temperature": 0.0, "strategy": "greedy", "top_p": 0.95, "top_k": 0}
HEX_ID = re.compile(r"[0-9a-f]{32}")


def keyed_settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(
        home=tmp_path / "home", api_keys="alpha:key-alpha", operator_keys="ops:key-ops", **extra
    )


@pytest.fixture
def client(tmp_path: Path, sqlite_database: Database) -> Iterator[TestClient]:
    app = create_app(keyed_settings(tmp_path), database=sqlite_database)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def samples(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics", headers=OPERATOR)
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def requests_total(found: dict[Any, float], **labels: str) -> float:
    return found.get(("corral_http_requests_total", frozenset(labels.items())), 0.0)


# ------------------------------------------------------------------ probes


def test_health_is_open_and_touches_nothing(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    database = Database(f"sqlite:///{gone / 'corral.db'}")
    shutil.rmtree(gone)
    app = create_app(keyed_settings(tmp_path), database=database)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_is_open_and_checks_the_database(client: TestClient) -> None:
    response = client.get("/ready")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "checks": {"database": {"ok": True}}}


def test_a_broken_database_is_named_but_never_described(tmp_path: Path) -> None:
    """The database's directory is gone: 503 naming `database`, with no path, driver or
    error text in the body."""
    gone = tmp_path / "gone"
    database = Database(f"sqlite:///{gone / 'corral.db'}")
    shutil.rmtree(gone)
    app = create_app(keyed_settings(tmp_path), database=database)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {
        "status": "not_ready",
        "checks": {"database": {"ok": False, "reason": "unavailable"}},
        "failed": ["database"],
    }
    for secret in (str(tmp_path), "gone", "sqlite", "corral.db", "unable", "Error"):
        assert secret not in response.text


class UnreachableLauncher:
    """A launcher whose Ray Jobs API is down; its error names a host."""

    def submit(self, job_key: str, *, attempt: int = 0) -> bool:
        raise AssertionError("nothing is submitted here")

    def info(self, submission_id: str) -> RayJobInfo | None:
        raise OSError("connection refused: http://10.1.2.3:8265 (token s3cr3t)")

    def stop(self, submission_id: str) -> bool:
        return False


class UnreachableIndex:
    """A vector index whose Milvus is down (only what readiness asks is implemented)."""

    def has_collection(self, name: str) -> bool:
        raise ConnectionError("Milvus at http://milvus.internal:19530 is unavailable")


def test_each_backend_is_checked_and_what_failed_is_named(
    tmp_path: Path, sqlite_database: Database
) -> None:
    app = create_app(
        keyed_settings(tmp_path),
        database=sqlite_database,
        launcher=UnreachableLauncher(),
        cluster_resources=lambda: {"CPU": 2.0},
        vector_index=UnreachableIndex(),  # type: ignore[arg-type]
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"] == {
        "database": {"ok": True},
        "ray": {"ok": True},
        "ray_jobs": {"ok": False, "reason": "unavailable"},
        "milvus": {"ok": False, "reason": "unavailable"},
    }
    assert body["failed"] == ["ray_jobs", "milvus"]
    for secret in ("10.1.2.3", "8265", "s3cr3t", "milvus.internal", "refused"):
        assert secret not in response.text


def test_a_hung_check_times_out_and_is_not_started_twice() -> None:
    release, calls = threading.Event(), []

    def hangs() -> None:
        calls.append(1)
        release.wait(10)

    readiness = Readiness({"database": hangs, "ray": lambda: None}, timeout_s=0.1)
    try:
        first = asyncio.run(readiness.check())
        second = asyncio.run(readiness.check())  # another event loop, as a new server's
    finally:
        release.set()
    assert first["database"].ok is False and first["database"].reason == "timed out"
    assert second["database"].reason == "timed out"
    assert first["ray"].ok and second["ray"].ok
    assert len(calls) == 1, "the second probe waited on the first one's check"


# ------------------------------------------------------------------ /metrics


def test_metrics_need_an_operator_key(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    refused = client.get("/metrics", headers=TENANT)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
    allowed = client.get("/metrics", headers=OPERATOR)
    assert allowed.status_code == 200
    assert allowed.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "corral_http_requests_total" in allowed.text


def test_without_keys_the_local_caller_reads_the_metrics(
    tmp_path: Path, sqlite_database: Database
) -> None:
    app = create_app(Settings(home=tmp_path / "home"), database=sqlite_database)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 200


def test_requests_are_counted_by_route_template_and_status(client: TestClient) -> None:
    for job_uuid in ("first-job", "second-job", "third-job"):
        assert client.get(f"/jobs/{job_uuid}", headers=TENANT).status_code == 404
    assert client.get("/datasets/get?dataset_id=x", headers=TENANT).status_code == 404
    assert client.get("/no/such/route", headers=TENANT).status_code == 404
    assert client.post("/health").status_code == 405
    assert client.get("/jobs/first-job").status_code == 401
    assert client.request("BREW", "/health").status_code == 405

    found = samples(client)
    assert requests_total(found, method="GET", route="/jobs/{job_uuid}", status="404") == 3
    assert requests_total(found, method="GET", route="/datasets/get", status="404") == 1
    assert requests_total(found, method="GET", route="unmatched", status="404") == 1
    assert requests_total(found, method="POST", route="/health", status="405") == 1
    assert requests_total(found, method="GET", route="unauthenticated", status="401") == 1
    assert requests_total(found, method="other", route="/health", status="405") == 1
    labels = {value for (_, pairs) in found for _, value in pairs}
    assert not {"first-job", "/jobs/first-job", "/no/such/route", "BREW"} & labels
    duration = (
        "corral_http_request_duration_seconds_count",
        frozenset({("method", "GET"), ("route", "/jobs/{job_uuid}")}),
    )
    assert found[duration] == 3


def _store_jobs(database: Database) -> None:
    with database.transaction() as session:
        store = JobStore(session)
        for n, tenant in enumerate(("alpha", "beta", "alpha")):
            store.create(
                job_uuid=f"job-{n}",
                tenant=tenant,
                kind=JobKind.SUPERVISED_FINE_TUNE,
                request={"n": n},
            )
        store.create(job_uuid="dpo-0", tenant="beta", kind=JobKind.PREFERENCE_OPTIMIZE, request={})
    with database.transaction() as session:
        store = JobStore(session)
        key = store.get("job-0", tenant="alpha").key
        store.transition(key, to=JobStatus.RUNNING)


def test_jobs_by_kind_and_state_are_read_at_scrape_time(
    client: TestClient, sqlite_database: Database
) -> None:
    before = samples(client)
    assert before[("corral_store_up", frozenset())] == 1
    assert before[("corral_jobs_queued", frozenset())] == 0
    _store_jobs(sqlite_database)

    found = samples(client)

    def jobs(kind: str, state: str) -> float:
        return found[("corral_jobs", frozenset({("kind", kind), ("state", state)}))]

    assert jobs("supervised_fine_tune", "scheduled") == 2
    assert jobs("supervised_fine_tune", "running") == 1
    assert jobs("preference_optimize", "scheduled") == 1
    assert jobs("synthetic_data_generation", "completed") == 0
    assert found[("corral_jobs_queued", frozenset())] == 3
    assert found[("corral_store_up", frozenset())] == 1


def test_a_store_that_does_not_answer_is_reported_down(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    database = Database(f"sqlite:///{gone / 'corral.db'}")
    shutil.rmtree(gone)
    app = create_app(keyed_settings(tmp_path), database=database)
    with TestClient(app, raise_server_exceptions=False) as client:
        found = samples(client)
    assert found[("corral_store_up", frozenset())] == 0
    assert not [name for name, _ in found if name.startswith("corral_jobs")]


# ------------------------------------------------------------------ generated tokens


class _Remote:
    def __init__(self, call: Any) -> None:
        self.remote = call


class FakeHandle:
    """What `generate` calls on a Serve handle: `app_name`, `generate.remote(request)`."""

    def __init__(self, app_name: str, tokens: int) -> None:
        self.app_name = app_name
        self.tokens = tokens
        self.generate = _Remote(self._generate)

    async def _generate(self, request: GenerationRequest) -> GenerationResult:
        if self.tokens < 0:
            raise RuntimeError("a bug in the fake engine")
        return GenerationResult(
            text="once upon",
            token_ids=tuple(range(self.tokens)),
            stop_reason=StopReason.END_OF_TURN,
            prompt_tokens=4,
        )


class FakeRouter:
    def __init__(self, handles: dict[str, FakeHandle]) -> None:
        self.handles = handles

    def handle_for(self, *, tenant: str, model: str, kind: str = "llm") -> Any:
        if model not in self.handles:
            raise NotFound(f"no model {model!r}")
        return self.handles[model]


def _completion(model: str) -> dict[str, Any]:
    return {
        "content": "Once",
        "model": model,
        "sampling_params": SAMPLING,
        "max_tokens": 0,
        "stream": False,
        "logprobs": False,
    }


@pytest.fixture
def model_client(tmp_path: Path, sqlite_database: Database) -> Iterator[TestClient]:
    router = FakeRouter(
        {"llama3_8b": FakeHandle("llm-small", 3), "llama3_70b": FakeHandle("llm-broken", -1)}
    )
    app = create_app(keyed_settings(tmp_path), database=sqlite_database, model_router=router)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_generated_tokens_are_counted_by_application(model_client: TestClient) -> None:
    for _ in range(2):
        response = model_client.post(
            "/inference/completion", json=_completion("llama3_8b"), headers=TENANT
        )
        assert response.status_code == 200, response.text
    batch = {
        "content_batch": ["a", "b"],
        "model": "llama3_8b",
        "sampling_params": SAMPLING,
        "max_tokens": 0,
        "logprobs": False,
    }
    response = model_client.post("/inference/batch_completion", json=batch, headers=TENANT)
    assert response.status_code == 200, response.text
    openai = {"model": "llama3_8b", "prompt": "Once"}
    response = model_client.post("/v1/completions", json=openai, headers=TENANT)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    found = samples(model_client)
    tokens = ("corral_generated_tokens_total", frozenset({("application", "llm-small")}))
    assert found[tokens] == 3 * 5  # two completions, a batch of two, one OpenAI completion


# ------------------------------------------------------------------ request ids and logs


@pytest.mark.parametrize("given", ["req-123", "0f1e2d3c", "trace:abc.DEF_9"])
def test_a_safe_request_id_is_echoed(client: TestClient, given: str) -> None:
    response = client.get("/health", headers={"X-Request-ID": given})
    assert response.headers["x-request-id"] == given


@pytest.mark.parametrize(
    "given",
    ["x" * 65, "has space", "<script>", "-starts-with-dash", "a;b", "naïve", "", 'id"quote'],
)
def test_an_unsafe_request_id_is_replaced(client: TestClient, given: str) -> None:
    response = client.get(
        "/health",
        headers=[("X-Request-ID", given.encode())],  # type: ignore[arg-type]
    )
    echoed = response.headers["x-request-id"]
    assert HEX_ID.fullmatch(echoed), echoed


def test_every_answer_carries_a_request_id(client: TestClient) -> None:
    ids = [
        client.get(path).headers["x-request-id"]
        for path in ("/health", "/ready", "/metrics", "/nowhere")
    ]
    assert all(HEX_ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the app logs meanwhile, as `CORRAL_LOG_FORMAT=json` writes it."""
    stream = io.StringIO()
    handler = log_handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_log_lines_carry_the_request_id_and_job(
    client: TestClient, sqlite_database: Database, json_lines: io.StringIO
) -> None:
    _store_jobs(sqlite_database)
    response = client.get("/jobs/job-2", headers=TENANT | {"X-Request-ID": "req-job-2"})
    assert response.status_code == 200
    (access,) = [r for r in _records(json_lines) if r.get("request_id") == "req-job-2"]
    assert access["logger"] == "corral.access"
    assert access["level"] == "INFO"
    assert access["route"] == "/jobs/{job_uuid}"
    assert access["status"] == 200 and access["method"] == "GET"
    assert access["job_uuid"] == "job-2"
    assert access["job_key"].endswith("_job-2") and access["job_key"] != "job-2"
    assert isinstance(access["duration_ms"], float) and access["time"]


def test_an_unexpected_error_is_logged_and_answered_with_the_request_id(
    model_client: TestClient, json_lines: io.StringIO
) -> None:
    response = model_client.post(
        "/inference/completion",
        json=_completion("llama3_70b"),
        headers=TENANT | {"X-Request-ID": "req-broken"},
    )
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-broken"
    assert "fake engine" not in response.text
    lines = [r for r in _records(json_lines) if r.get("request_id") == "req-broken"]
    (error,) = [r for r in lines if r["level"] == "ERROR"]
    assert error["logger"] == "corral.app"
    assert "a bug in the fake engine" in error["exc_info"]
    assert (
        requests_total(
            samples(model_client), method="POST", route="/inference/completion", status="500"
        )
        == 1
    )


def test_text_log_lines_keep_their_format(client: TestClient) -> None:
    stream = io.StringIO()
    handler = log_handler("text", stream)
    access = logging.getLogger("corral.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        client.get("/health", headers={"X-Request-ID": "req-text"})
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    (line,) = stream.getvalue().splitlines()
    assert re.fullmatch(r"\S+ \S+ INFO corral\.access: GET /health 200 \d+\.\d ms", line), line


def test_the_database_ping_never_waits_on_a_writer(sqlite_database: Database) -> None:
    """SQLite transactions here begin IMMEDIATE (a write lock): the ping takes none."""
    with sqlite_database.transaction() as session:
        JobStore(session).counts()  # this transaction now holds the write lock
        started = time.monotonic()
        sqlite_database.ping()
        assert time.monotonic() - started < 1


def test_the_ray_check_needs_a_connected_process(
    monkeypatch: pytest.MonkeyPatch, sqlite_database: Database
) -> None:
    import ray

    readiness = build_readiness(database=sqlite_database, timeout_s=5, has_ray=True)
    assert readiness.names == ["database", "ray"]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert asyncio.run(readiness.check())["ray"].reason == "unavailable"
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    assert asyncio.run(readiness.check())["ray"].ok
