"""The checkpointer's side of object storage (jobs/checkpointer.py), on a real S3 protocol
server: a job whose last checkpoint row is an `s3://` URI resumes from it (downloaded once
per node, its progress read back), a model in S3 (DPO's start) is loaded from this node's
copy, and a launch config with a storage URI survives the store as it was planned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from corral.storage import Storage
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStore
from corral.tenancy import job_key
from jobs.checkpointer import TRAINER_STATE, Checkpointer, TrainerState, with_local_model
from jobs.config import SFTJobConfig
from serve_apps.model_cache import StorageOptions
from tests.jobs.test_config import STORED_SFT


@pytest.fixture
def storage(s3_server: str, s3_bucket: str) -> Storage:
    return Storage(f"s3://{s3_bucket}/corral", options=StorageOptions(s3_endpoint=s3_server))


def launch(storage: Storage, database: Database, **changes: Any) -> SFTJobConfig:
    output_uri = storage.job_uri("alpha", "job-1")
    return SFTJobConfig.model_validate(
        STORED_SFT
        | {
            "report_to": {"database_url": database.url},
            "job_key": job_key("alpha", "job-1"),
            "output_uri": output_uri,
            "storage": storage.options.model_dump(),
        }
        | changes
    )


def test_a_job_resumes_from_a_checkpoint_in_s3(
    storage: Storage,
    sqlite_database: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the node's model cache lives there
    written = tmp_path / "iter-3"
    written.mkdir()
    (written / "config.json").write_text('{"model_type": "llama"}')
    torch.save({"epochs_done": 1, "step": 3}, written / TRAINER_STATE)
    uri = f"{storage.job_uri('alpha', 'job-1')}/checkpoints/iter-3"
    storage.upload_dir(written, uri)
    config = launch(storage, sqlite_database)
    with sqlite_database.transaction() as session:
        jobs = JobStore(session)
        jobs.create(job_uuid="job-1", tenant="alpha", kind=JobKind.SUPERVISED_FINE_TUNE, request={})
        jobs.add_checkpoint(config.job_key, iters=3, path=uri)

    with Checkpointer(config, reporter=None).resume() as resume:
        assert resume is not None
        assert resume.source == uri
        assert resume.state == TrainerState(epochs_done=1, step=3)
        assert (resume.directory / "config.json").read_text() == '{"model_type": "llama"}'
        assert resume.directory.is_relative_to(tmp_path / "home")

    # DPO from a checkpoint in S3: the recipe loads this node's copy of it.
    local = with_local_model(config.model_copy(update={"model_dir": uri}))
    assert isinstance(local.model_dir, Path) and (local.model_dir / "config.json").is_file()
    assert with_local_model(launch(storage, sqlite_database)).model_dir == Path("/m")


def test_a_launch_config_with_a_storage_uri_dumps_back_as_planned(
    storage: Storage, sqlite_database: Database
) -> None:
    config = launch(storage, sqlite_database, model_dir="s3://bucket/m")
    dumped = config.model_dump(mode="json")
    assert "report_to" not in dumped  # where the job reports is never stored
    assert dumped["model_dir"] == "s3://bucket/m"
    assert dumped["output_uri"] == storage.job_uri("alpha", "job-1")
    assert SFTJobConfig.model_validate(dumped) == config.model_copy(update={"report_to": None})
