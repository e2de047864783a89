"""The job entrypoint: it dispatches by kind through one table, imports no recipe (nor
torch) until a job of its kind runs, and records a kind without a recipe as failed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs import launch


def test_training_kinds_have_recipes_and_none_is_imported_up_front() -> None:
    assert set(launch.RECIPES) == {JobKind.SUPERVISED_FINE_TUNE, JobKind.PREFERENCE_OPTIMIZE}
    code = (
        "import sys, jobs.launch; "
        "loaded = {'torch', 'transformers', 'jobs.sft', 'jobs.dpo'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.integration
def test_a_kind_without_a_recipe_fails_with_the_reason(database: Database) -> None:
    with database.transaction() as session:
        JobStore(session).create(
            job_uuid="gen", tenant="t", kind=JobKind.SYNTHETIC_DATA_GENERATION, request={}
        )
    assert launch.run(job_key("t", "gen"), database.url) is JobStatus.FAILED
    with database.transaction() as session:
        job = JobStore(session).get("gen", tenant="t")
        assert "synthetic_data_generation" in (job.error or "")
        assert "no recipe" in (job.error or "")
