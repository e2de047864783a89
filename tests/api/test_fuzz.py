"""Schemathesis against the app's own OpenAPI document (corral/openapi.json): every
operation, with data that fits the document and data that does not, then the stateful
run along the links schemathesis infers between operations, on SQLite and on
PostgreSQL, against an app with real Ray and Serve behind it (a file model on the
scripted engine answers every spec model name, and one on the scripted scoring engine the
reward model's, so inference and reward scoring run instead of answering 404 or 501;
memory banks run on the session's Milvus Lite server and embedding app).
Fine-tuning submissions go to a launcher that records them: a fuzzed body that passed
every check would otherwise start a real training run.
The running jobs' routes (`/internal/jobs/...`) are not in the document: they take a
job token, not a key, and tests/api/test_internal_jobs.py fuzzes their bodies.

The jobs dashboard's routes are not in the document (HTML pages and a form): a second
test fuzzes its sign-in form, its cookie, its static file names and the headers it judges
origins by. Nothing fuzzed signs in, sets a cookie or gets past the cookie check.

Per response: no server error (a 501 naming a capability this build lacks is the one 5xx
allowed: it is the documented answer of the operations with no engine yet), the status
and the body are the documented ones (schemathesis's checks), and the body, every SSE
`data:` item and every JSON Lines line validate against the document
(tests/api/response_validation.py; the spec declares streamed chunks as
`application/json`, so schemathesis's content-type check skips `text/event-stream`).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from corral import openapi_doc
from corral.app import create_app, fetch_policy
from corral.config import Settings
from corral.content import ContentFetcher
from corral.ray_jobs import RayJobInfo
from corral.routes.dashboard import STATIC_FILES
from corral.services.models import ModelService, build_model_service
from corral.serving.catalog import ModelSpec, file_app_name, model_roots
from corral.serving.deployer import ServeDeployer
from corral.serving.resolver import ModelResolver
from corral.sessions import COOKIE_NAME
from corral.store.db import Database
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engines
from serve_apps.options import ModelKind
from tests.api.conftest import ALPHA, API_KEYS
from tests.api.response_validation import ResponseValidator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Examples per operation and generation mode: ~31 operations x (positive + negative) x 2
# backends stays within about a minute on two cores.
EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "8"))
STATEFUL_EXAMPLES = int(os.environ.get("CORRAL_FUZZ_STATEFUL_EXAMPLES", "10"))
MODEL = "fuzz-scripted"
REWARD_MODEL = "fuzz-reward"  # the scripted scoring engine, under the spec's reward name
SPEC_MODEL_NAMES = ["llama3_8b_chat", "llama3_70b_chat", "llama3_8b", "llama3_70b"]
# Replicas a fuzzed scale request may ask for: each is a Ray actor process.
MAX_FUZZ_REPLICAS = 1
DEPLOY_DEADLINE_S = 120.0

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RecordingLauncher:
    """A `JobLauncher` that records submissions and runs nothing."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, job_uuid: str, *, attempt: int = 0) -> bool:
        if job_uuid in self.submitted:
            return False
        self.submitted.append(job_uuid)
        return True

    def info(self, job_uuid: str) -> RayJobInfo | None:
        return None

    def stop(self, job_uuid: str) -> bool:
        return job_uuid in self.submitted


class RequestsOnly:
    """The app for schemathesis's in-process client, which would start the app's lifespan
    and keep it for the rest of the process; the test runs the lifespan itself."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await self.app(scope, receive, send)


class WithEmbeddings:
    """The registry's router, but embedding models come from the session's embedding app
    (the registry's deployer runs the scripted engine: given the app's spec, its start
    would redeploy the app on it)."""

    def __init__(self, models: ModelService, embeddings: ModelResolver) -> None:
        self._models = models.resolver
        self._embeddings = embeddings

    def handle_for(self, *, tenant: str, model: str, kind: ModelKind = "llm") -> Any:
        router = self._embeddings if kind == "embedding" else self._models
        return router.handle_for(tenant=tenant, model=model, kind=kind)


@pytest.fixture
def fuzz_app(
    serve_instance: None,
    embedding_app: Any,
    vector_index: Any,
    database: Database,
    tmp_path: Path,
) -> Iterator[tuple[FastAPI, ModelService]]:
    checkpoint = tmp_path / "scripted"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")  # the scripted engine reads no weights
    settings = Settings(
        home=tmp_path / "home",
        api_keys=API_KEYS,
        dataset_roots=str(tmp_path),
        fetch_timeout_s=2.0,
        # One generation at most on the synchronous route: each fuzzed request that got
        # through would start a Ray Data pipeline (seconds each); beyond it, the 422.
        sdg_max_sync_generations=1,
        memory_embedding_model=embedding_app.name,
    )
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(
            engine_factory=partial(scripted_engines, ScriptedEngineConfig("a scripted reply"))
        ),
        file_models=[
            ModelSpec(
                name=MODEL,
                aliases=SPEC_MODEL_NAMES,
                checkpoint_dir=checkpoint,
                cpus_per_replica=0.1,
            ),
            ModelSpec(
                name=REWARD_MODEL,
                kind="reward",
                aliases=["llama3_405b_reward"],
                checkpoint_dir=checkpoint,
                cpus_per_replica=0.1,
            ),
        ],
        model_roots=model_roots(settings),
    )
    registry.start()
    try:
        _wait_until_running(registry)
        app = create_app(
            settings,
            database=database,
            fetcher=ContentFetcher(fetch_policy(settings)),
            models=registry,
            model_router=WithEmbeddings(
                registry,
                ModelResolver(
                    database=database, deployer=ServeDeployer(), file_models=[embedding_app.spec]
                ),
            ),
            launcher=RecordingLauncher(),
            vector_index=vector_index,
        )
        yield app, registry
    finally:
        from ray import serve

        serve.delete(file_app_name(MODEL))
        serve.delete(file_app_name(REWARD_MODEL))


def _wait_until_running(registry: ModelService) -> None:
    deadline = time.monotonic() + DEPLOY_DEADLINE_S
    status = "unknown"
    while time.monotonic() < deadline:
        status = next(m.status for m in registry.list("alpha") if m.name == MODEL)
        if status == "RUNNING":
            return
        time.sleep(0.2)  # polling Serve's own status, bounded by the deadline
    raise AssertionError(f"the scripted model did not start within {DEPLOY_DEADLINE_S}s: {status}")


def _content_type(response: Any) -> str | None:
    """Schemathesis's responses hold each header as a list of values."""
    for name, value in response.headers.items():
        if name.lower() == "content-type":
            return str(value[0]) if isinstance(value, list) else str(value)
    return None


def _check_server_error(case: Any, response: Any) -> None:
    if response.status_code < 500:
        return
    if response.status_code == 501:
        body = json.loads(response.content)
        if body["error"]["code"] == "not_implemented":
            return
    raise AssertionError(
        f"{case.operation.label} -> {response.status_code}: {response.content[:500]!r}\n"
        f"request body: {json.dumps(getattr(case, 'body', None), default=str)[:500]}"
    )


def _check_body(validator: ResponseValidator, case: Any, response: Any) -> None:
    checker = validator.checker(
        case.operation.method, case.operation.path, response.status_code, _content_type(response)
    )
    assert checker is not None, f"{case.operation.label} is in the document"
    checker.feed(response.content)
    checker.finish()


def _bounded(case: Any) -> Any:
    """Keep fuzzed scale requests from starting dozens of replica processes."""
    if case.operation.path == "/models/scale" and isinstance(case.body, dict):
        for field in ("replicas", "min_replicas", "max_replicas"):
            if isinstance(case.body.get(field), int) and case.body[field] > MAX_FUZZ_REPLICAS:
                case.body[field] = MAX_FUZZ_REPLICAS
    return case


def _fuzz_operation(
    operation: Any,
    validator: ResponseValidator,
    mode: schemathesis.GenerationMode,
    statuses: Counter[tuple[str, int]],
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case = _bounded(case)
        response = case.call(headers=ALPHA)
        statuses[(operation.label, response.status_code)] += 1
        _check_response(validator, case, response, positive=mode.is_positive)

    run()


def _check_response(
    validator: ResponseValidator, case: Any, response: Any, *, positive: bool
) -> None:
    _check_server_error(case, response)
    streamed = (_content_type(response) or "").startswith("text/event-stream")
    checks = [status_code_conformance, response_schema_conformance]
    if not streamed:
        checks.append(content_type_conformance)
    if positive or response.status_code < 400:
        case.validate_response(response, checks=checks)
    _check_body(validator, case, response)


def _run_stateful(schema: Any, validator: ResponseValidator) -> int:
    """Follow the links schemathesis infers between operations (an id in one response
    used in the next request); returns how many links there are."""
    transitions = schema.as_state_machine()._transitions.operations
    links = sum(len(t.outgoing) for t in transitions.values())
    if links == 0:
        return 0

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": ALPHA}

        def before_call(self, case: Any) -> None:
            _bounded(case)

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            _check_response(validator, case, response, positive=True)

    Workflow.run(
        settings=settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=4,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    return links


def test_every_operation_survives_the_fuzzer(
    fuzz_app: tuple[FastAPI, ModelService], response_validator: ResponseValidator
) -> None:
    app, _registry = fuzz_app
    schema = schemathesis.openapi.from_dict(openapi_doc.committed())
    schema.app = RequestsOnly(app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(
        [op for path in schema.raw_schema["paths"].values() for op in path]
    )
    failures: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()
    links = 0
    with TestClient(app):  # the lifespan: services, and the reconciler over the launcher
        for operation in operations:
            for mode in (
                schemathesis.GenerationMode.POSITIVE,
                schemathesis.GenerationMode.NEGATIVE,
            ):
                try:
                    _fuzz_operation(operation, response_validator, mode, statuses)
                except Unsatisfiable:
                    # Nothing to negate (e.g. no parameters and no body): no negative case.
                    assert mode == schemathesis.GenerationMode.NEGATIVE
                except Exception as exc:
                    # Hypothesis's own errors (a flaky example) hold the real ones inside.
                    inner = "; ".join(repr(e) for e in getattr(exc, "exceptions", ()))
                    failures.append(f"{operation.label} ({mode}): {exc} {inner}"[:3000])
        try:
            links = _run_stateful(schema, response_validator)
        except Exception as exc:
            failures.append(f"stateful: {exc}"[:3000])
    assert failures == [], "\n\n".join(failures)
    # The document's operations link (e.g. a job listed, then read): the stateful run ran.
    assert links > 0
    # The model answered: inference ran on Serve, not only the validation in front of it.
    for label in ANSWERED + MEMORY:
        assert statuses[(label, 200)] > 0, sorted(statuses.items())
    # The generation routes reached their service (its 422s: the cap, a model of the wrong
    # kind or none), never the 501 of a server without the capability.
    for label in GENERATION:
        assert statuses[(label, 422)] > 0 and statuses[(label, 501)] == 0, sorted(
            (key, n) for key, n in statuses.items() if key[0] == label
        )


# Operations whose fuzzed requests must reach the scripted model at least once.
ANSWERED = [
    "POST /inference/completion",
    "POST /inference/chat_completion",
    "POST /inference/batch_completion",
    "POST /inference/batch_chat_completion",
    "POST /reward_scoring/score",
]
# Memory bank operations that must have done real work at least once (a bank made, a
# listing, a query answered) rather than only refusing what was fuzzed.
MEMORY = ["POST /memory_banks/configure", "GET /memory_banks/get"]
# Synthetic data operations (a synchronous cap of one generation here: see fuzz_app).
GENERATION = ["POST /synthetic_data_generation/generate", "POST /synthetic_data_generation/jobs"]


# Header values a client can send: printable ASCII (h11 refuses control characters).
_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
_FORM_TYPES = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=utf-8",
        "multipart/form-data; boundary=x",
        "application/json",
        "text/plain",
        "",
    ]
)


def test_the_dashboard_sign_in_survives_the_fuzzer(
    tmp_path: Path, sqlite_database: Database
) -> None:
    app = create_app(Settings(home=tmp_path / "home", api_keys=API_KEYS), database=sqlite_database)
    answers: Counter[tuple[str, int]] = Counter()

    @given(
        body=st.one_of(
            st.binary(max_size=600),
            st.builds(lambda v: b"api_key=" + v, st.binary(max_size=200)),
            _HEADER_TEXT.map(lambda v: ("api_key=" + v).encode()),
        ),
        content_type=_FORM_TYPES,
        origin=st.one_of(st.none(), _HEADER_TEXT, st.just("http://testserver")),
        cookie=_HEADER_TEXT,
        name=_HEADER_TEXT.filter(lambda v: "/" not in v and "?" not in v and "#" not in v),
    )
    @settings(
        max_examples=EXAMPLES * 25,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(body: bytes, content_type: str, origin: str | None, cookie: str, name: str) -> None:
        client.cookies.clear()
        headers = {"Content-Type": content_type} | ({"Origin": origin} if origin else {})
        login = client.post(
            "/dashboard/login", content=body, headers=headers, follow_redirects=False
        )
        answers[("login", login.status_code)] += 1
        assert login.status_code in (400, 401, 403), (body, login.status_code)
        assert "set-cookie" not in login.headers
        jar = {"Cookie": f"{COOKIE_NAME}={cookie}"}
        assert client.get("/jobs", headers=jar).status_code == 401
        page = client.get("/dashboard", headers=jar, follow_redirects=False)
        assert page.status_code == 303
        static = client.get(f"/dashboard/static/{name}")
        answers[("static", static.status_code)] += 1
        # A name that is no file: 404; one that makes no static path at all (an empty
        # name, an escaped slash) never reaches it without a key: 401.
        assert static.status_code in (200, 401, 404), (name, static.status_code)
        assert static.status_code != 200 or name in STATIC_FILES, name

    with TestClient(app, raise_server_exceptions=False) as client:
        run()
    # The fuzzer reached the key check itself, not only the form and origin checks.
    assert answers[("login", 401)] > 0 and answers[("login", 400)] > 0, answers
