"""Migrations on both backends: from empty to head, down to base and up again, and the
models agree with what the migrations build."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from corral.store import migrate
from corral.store.db import Database, make_engine
from corral.store.jobs import JobStore, Progress
from corral.store.models import RegisteredModel, ServedModelStore
from corral.store.tables import Base, Job, ServedModel
from corral.tenancy import job_key
from serve_apps.options import ReplicaOptions

EXPECTED_TABLES = {
    "jobs",
    "job_metrics",
    "job_log_lines",
    "checkpoints",
    "datasets",
    "agents",
    "memory_banks",
    "memory_bank_documents",
    "served_models",
    "file_model_scales",
    "leases",
}

pytestmark = pytest.mark.integration


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _model_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_from_empty_reaches_head(empty_database_url: str) -> None:
    assert migrate.current_revision(empty_database_url) is None
    migrate.upgrade(empty_database_url)
    assert migrate.current_revision(empty_database_url) == migrate.head_revision()
    assert _tables(empty_database_url) == EXPECTED_TABLES


def test_downgrade_to_base_and_up_again(empty_database_url: str) -> None:
    migrate.upgrade(empty_database_url)
    migrate.downgrade(empty_database_url, "base")
    assert migrate.current_revision(empty_database_url) is None
    assert _tables(empty_database_url) == set()
    migrate.upgrade(empty_database_url)
    assert _tables(empty_database_url) == EXPECTED_TABLES


def test_models_match_migrations(database_url: str) -> None:
    assert _model_diff(database_url) == []


def test_every_model_table_is_expected() -> None:
    assert set(Base.metadata.tables) == EXPECTED_TABLES


def test_upgrade_is_idempotent(database_url: str) -> None:
    migrate.upgrade(database_url)
    assert migrate.current_revision(database_url) == migrate.head_revision()


def test_job_keys_migration_keeps_existing_jobs_their_logs_and_checkpoints(
    empty_database_url: str,
) -> None:
    """Rows from before job keys keep their uuid as their key (the id their Ray job and
    checkpoint folder have), with every log line, checkpoint and registered model; and
    the way back restores them."""
    url = empty_database_url
    migrate.upgrade(url, "0002")
    now = "2026-11-30 12:00:00+00:00"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (uuid, tenant, kind, status, request, request_digest,"
                    " scheduled_at, updated_at, attempt) VALUES"
                    " ('old-job', 'alpha', 'supervised_fine_tune', 'completed', '{}', 'd',"
                    " :now, :now, 0)"
                ),
                {"now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO job_log_lines (job_uuid, logged_at, line)"
                    " VALUES ('old-job', :now, 'step 1 loss 2.0')"
                ),
                {"now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO checkpoints (job_uuid, tenant, iters, path, created_at)"
                    " VALUES ('old-job', 'alpha', 4, '/ckpt/old-job/iter-4', :now)"
                ),
                {"now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO served_models (tenant, name, checkpoint_dir, engine,"
                    " gpus_per_replica, min_replicas, max_replicas, target_ongoing_requests,"
                    " max_batch_size, source_job_uuid, created_at, updated_at) VALUES"
                    " ('alpha', 'mine', '/ckpt/old-job/iter-4', 'transformers', 0, 1, 1, 2, 8,"
                    " 'old-job', :now, :now)"
                ),
                {"now": now},
            )
    finally:
        engine.dispose()

    migrate.upgrade(url)
    db = Database(url)
    try:
        with db.transaction() as session:
            store = JobStore(session)
            job = store.get("old-job", tenant="alpha")
            assert (job.key, job.status, job.stop_pending) == ("old-job", "completed", False)
            assert [line.line for line in store.log_lines(job.key)] == ["step 1 loss 2.0"]
            assert [c.path for c in store.checkpoints(job.key)] == ["/ckpt/old-job/iter-4"]
            model = session.get(ServedModel, ("alpha", "mine"))
            assert model is not None and model.source_job_uuid == "old-job"
    finally:
        db.dispose()

    migrate.downgrade(url, "0002")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT job_uuid, line FROM job_log_lines")).all() == [
                ("old-job", "step 1 loss 2.0")
            ]
            assert conn.execute(text("SELECT job_uuid, iters FROM checkpoints")).all() == [
                ("old-job", 4)
            ]
            assert conn.execute(text("SELECT source_job_uuid FROM served_models")).all() == [
                ("old-job",)
            ]
    finally:
        engine.dispose()


def test_model_options_migration_carries_every_registered_model_over_and_back(
    empty_database_url: str,
) -> None:
    """0005 moves a registered model's sizing columns into its one `options` object (with
    the CPUs it was served with) and makes it an LLM; the way back restores the columns."""
    url = empty_database_url
    migrate.upgrade(url, "0004")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO served_models (tenant, name, checkpoint_dir, adapter_dir, engine,"
                    " gpus_per_replica, min_replicas, max_replicas, target_ongoing_requests,"
                    " max_batch_size, source_job_uuid, created_at, updated_at) VALUES"
                    " ('alpha', 'mine', '/ckpt/a', '/ckpt/a/adapter', 'transformers', 0.5, 0, 3,"
                    " 4, 16, NULL, :now, :now)"
                ),
                {"now": "2026-11-30 12:00:00+00:00"},
            )
    finally:
        engine.dispose()

    migrate.upgrade(url)
    db = Database(url)
    try:
        with db.transaction() as session:
            model = ServedModelStore(session).get(tenant="alpha", name="mine")
        assert model is not None
        assert (model.kind, model.checkpoint_dir, model.adapter_dir) == (
            "llm",
            "/ckpt/a",
            "/ckpt/a/adapter",
        )
        assert model.options == ReplicaOptions(
            engine="transformers",
            gpus_per_replica=0.5,
            cpus_per_replica=0.5,
            min_replicas=0,
            max_replicas=3,
            target_ongoing_requests=4,
            max_batch_size=16,
        )
    finally:
        db.dispose()

    migrate.downgrade(url, "0004")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(
                text(
                    "SELECT name, engine, gpus_per_replica, min_replicas, max_replicas,"
                    " target_ongoing_requests, max_batch_size FROM served_models"
                )
            ).all() == [("mine", "transformers", 0.5, 0, 3, 4.0, 16)]
        # The CHECK constraint on the bounds is back with the columns.
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE served_models SET min_replicas = 5"))
    finally:
        engine.dispose()


def test_job_metrics_migration_carries_old_progress_over_and_back(
    empty_database_url: str,
) -> None:
    """A job from before metrics were data keeps its progress: its planned total and its
    step figures come over from its log lines (the last line of a step logged twice
    wins); the way back drops them and keeps the job and its lines."""
    url = empty_database_url
    migrate.upgrade(url, "0005")
    key = job_key("alpha", "old-job")
    lines = [
        "attempt 0: lora on 2 workers",
        "plan: 4 steps (2 epochs of 2)",
        "step 1 loss 2.5000 lr 1.000e-03 tokens/s 100",
        "step 2 loss nan lr 9.000e-04 tokens/s 90",
        "epoch 1 validation loss 2.0000",
        "step 2 loss 2.2500 lr 9.000e-04 tokens/s 95 reward_accuracy 0.50 reward_margin 0.1",
    ]
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO jobs (key, uuid, tenant, kind, status, request, request_digest,"
                    " scheduled_at, updated_at, attempt) VALUES"
                    " (:key, 'old-job', 'alpha', 'supervised_fine_tune', 'running', '{}', 'd',"
                    " '2026-11-30 12:00:00+00:00', '2026-11-30 12:00:00+00:00', 0)"
                ),
                {"key": key},
            )
            for second, line in enumerate(lines):
                conn.execute(
                    text(
                        "INSERT INTO job_log_lines (job_key, logged_at, line)"
                        " VALUES (:key, :at, :line)"
                    ),
                    {"key": key, "at": f"2026-11-30 12:00:0{second}+00:00", "line": line},
                )
    finally:
        engine.dispose()

    migrate.upgrade(url)  # the ORM reads the head's columns
    db = Database(url)
    try:
        with db.transaction() as session:
            store = JobStore(session)
            job = store.get("old-job", tenant="alpha")
            assert job.total_steps == 4
            rows = [(m.step, m.epoch, m.values) for m in store.metrics(key)]
            assert rows == [
                (1, None, {"loss": 2.5, "learning_rate": 1e-3, "tokens_per_second": 100.0}),
                (
                    2,
                    None,
                    {
                        "loss": 2.25,
                        "learning_rate": 9e-4,
                        "tokens_per_second": 95.0,
                        "reward_accuracy": 0.5,
                        "reward_margin": 0.1,
                    },
                ),
            ]
            assert store.progress(job) == Progress(step=2, total_steps=4, loss=2.25)
            assert len(store.log_lines(key)) == len(lines)
    finally:
        db.dispose()

    migrate.downgrade(url, "0005")
    assert "job_metrics" not in _tables(url)
    engine = make_engine(url)
    try:
        assert "total_steps" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT uuid, status FROM jobs")).all() == [
                ("old-job", "running")
            ]
            assert conn.execute(text("SELECT count(*) FROM job_log_lines")).scalar() == len(lines)
    finally:
        engine.dispose()


def test_score_weights_migration_keeps_models_and_goes_back(empty_database_url: str) -> None:
    """0007 adds a reward model's label weights: models stored before have none (they are
    LLMs), a reward model's weights are stored and read back; the way back drops the
    column and keeps every model."""
    url = empty_database_url
    migrate.upgrade(url, "0006")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO served_models (tenant, name, kind, checkpoint_dir, options,"
                    " created_at, updated_at) VALUES ('alpha', 'old', 'llm', '/ckpt/a', :options,"
                    " :now, :now)"
                ),
                {"options": '{"engine": "transformers"}', "now": "2026-11-30 12:00:00+00:00"},
            )
    finally:
        engine.dispose()

    migrate.upgrade(url)
    db = Database(url)
    weights = {"helpfulness": 1.0, "verbosity": -0.5}
    try:
        with db.transaction() as session:
            store = ServedModelStore(session)
            old = store.get(tenant="alpha", name="old")
            assert old is not None and old.score_weights is None
            store.add(
                RegisteredModel(
                    tenant="alpha",
                    name="judge",
                    kind="reward",
                    checkpoint_dir="/ckpt/judge",
                    adapter_dir=None,
                    options=ReplicaOptions(),
                    score_weights=weights,
                )
            )
        with db.transaction() as session:
            judge = ServedModelStore(session).get(tenant="alpha", name="judge")
            assert judge is not None and judge.score_weights == weights
    finally:
        db.dispose()

    migrate.downgrade(url, "0006")
    engine = make_engine(url)
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("served_models")}
        assert "score_weights" not in columns
        with engine.connect() as conn:
            assert conn.execute(
                text("SELECT name, kind FROM served_models ORDER BY name")
            ).all() == [
                ("judge", "reward"),
                ("old", "llm"),
            ]
    finally:
        engine.dispose()


def test_memory_banks_migration_gives_old_banks_settings_and_documents_go_back(
    empty_database_url: str,
) -> None:
    """0008 gives a bank stored before the default settings of its time and no
    collection dimension yet, adds the documents table (its rows go when their bank goes,
    by the foreign key's cascade), and the way back drops the documents and the settings
    and keeps the bank."""
    url = empty_database_url
    migrate.upgrade(url, "0007")
    now = "2026-11-30 12:00:00+00:00"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO memory_banks (tenant, uuid, name, collection, created_at)"
                    " VALUES ('alpha', 'old-bank', 'notes', 'corral_old', :now)"
                ),
                {"now": now},
            )
    finally:
        engine.dispose()

    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            assert conn.execute(
                text(
                    "SELECT name, embedding_model, chunk_tokens, overlap_tokens, dimension"
                    " FROM memory_banks"
                )
            ).all() == [("notes", "all-minilm-l6-v2", 192, 48, 0)]
            conn.execute(
                text(
                    "INSERT INTO memory_bank_documents (tenant, bank_uuid, uuid, mime_type,"
                    " metadata, content, content_digest, version, chunk_count, created_at,"
                    " updated_at) VALUES ('alpha', 'old-bank', 'doc', 'text/plain', '{}',"
                    " 'aGk=', 'd', 1, 1, :now, :now)"
                ),
                {"now": now},
            )
        # A document of a bank nobody has is refused by the foreign key.
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO memory_bank_documents (tenant, bank_uuid, uuid, mime_type,"
                    " metadata, content, content_digest, version, chunk_count, created_at,"
                    " updated_at) VALUES ('beta', 'old-bank', 'doc', 'text/plain', '{}',"
                    " 'aGk=', 'd', 1, 1, :now, :now)"
                ),
                {"now": now},
            )
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM memory_banks WHERE uuid = 'old-bank'"))
            assert conn.execute(text("SELECT count(*) FROM memory_bank_documents")).scalar() == 0
            conn.execute(
                text(
                    "INSERT INTO memory_banks (tenant, uuid, name, collection, created_at,"
                    " embedding_model, chunk_tokens, overlap_tokens, dimension) VALUES"
                    " ('alpha', 'new-bank', 'more', 'corral_new', :now, 'mini', 64, 8, 384)"
                ),
                {"now": now},
            )
    finally:
        engine.dispose()

    migrate.downgrade(url, "0007")
    assert "memory_bank_documents" not in _tables(url)
    engine = make_engine(url)
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("memory_banks")}
        assert columns == {"tenant", "uuid", "name", "collection", "created_at"}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT uuid, name FROM memory_banks")).all() == [
                ("new-bank", "more")
            ]
    finally:
        engine.dispose()


def test_admission_migration_admits_every_stored_job_and_the_way_back_keeps_them(
    empty_database_url: str,
) -> None:
    """0010: every job stored before was handed to Ray at submission, so each counts as
    admitted at its `scheduled_at`; unfinished ones get their need from their launch
    config (workers x GPU or CPU; a generation job's stage actors), finished ones none.
    Down again, the rows and their log lines stay."""
    url = empty_database_url
    migrate.upgrade(url, "0009")
    now = "2026-12-01 12:00:00+00:00"
    rows = [
        ("t_gpu", "supervised_fine_tune", "scheduled", '{"num_workers": 4, "use_gpu": true}'),
        ("t_cpu", "preference_optimize", "running", '{"num_workers": 2, "use_gpu": false}'),
        ("t_sdg", "synthetic_data_generation", "running", "{}"),
        ("t_done", "supervised_fine_tune", "completed", '{"num_workers": 2}'),
    ]
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for key, kind, status, launch in rows:
                conn.execute(
                    text(
                        "INSERT INTO jobs (key, uuid, tenant, kind, status, request,"
                        " request_digest, scheduled_at, updated_at, attempt, launch,"
                        " stop_pending) VALUES (:key, :key, 't', :kind, :status, '{}', 'd',"
                        " :now, :now, 0, :launch, false)"
                    ),
                    {"key": key, "kind": kind, "status": status, "now": now, "launch": launch},
                )
            conn.execute(
                text(
                    "INSERT INTO job_log_lines (job_key, logged_at, line)"
                    " VALUES ('t_gpu', :now, 'submitted')"
                ),
                {"now": now},
            )
    finally:
        engine.dispose()

    migrate.upgrade(url)
    db = Database(url)
    try:
        with db.transaction() as session:
            jobs = {job.key: job for job in session.scalars(select(Job))}
            assert {key: job.need for key, job in jobs.items()} == {
                "t_gpu": {"GPU": 4.0},
                "t_cpu": {"CPU": 2.0},
                "t_sdg": {"CPU": 0.15},
                "t_done": None,
            }
            assert all(job.admitted_at == job.scheduled_at for job in jobs.values())
            assert all(job.queue_position is None for job in jobs.values())
    finally:
        db.dispose()

    migrate.downgrade(url, "0009")
    assert "leases" not in _tables(url)
    engine = make_engine(url)
    try:
        assert "need" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 4
            assert conn.execute(text("SELECT line FROM job_log_lines")).all() == [("submitted",)]
    finally:
        engine.dispose()
