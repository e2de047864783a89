"""The job entrypoint: it dispatches by kind through one table, imports no recipe (nor
torch, nor Ray Data) until a job of its kind runs, and records a job whose launch config
its recipe refuses as failed, with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest

from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs import launch


def test_every_kind_has_a_recipe_and_none_is_imported_up_front() -> None:
    assert set(launch.RECIPES) == set(JobKind)
    code = (
        "import sys, jobs.launch; "
        "loaded = {'torch', 'transformers', 'ray.data', 'jobs.sft', 'jobs.dpo', "
        "'jobs.sdg.job'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.integration
def test_a_launch_config_the_recipe_refuses_fails_with_the_reason(database: Database) -> None:
    with database.transaction() as session:
        JobStore(session).create(
            job_uuid="gen", tenant="t", kind=JobKind.SYNTHETIC_DATA_GENERATION, request={}
        )
    assert launch.run(job_key("t", "gen"), database.url) is JobStatus.FAILED
    with database.transaction() as session:
        job = JobStore(session).get("gen", tenant="t")
        assert "ValidationError" in (job.error or "")
        assert "pipeline" in (job.error or "")
