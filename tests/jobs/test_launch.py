"""The job entrypoint: it dispatches by kind through one table, imports no recipe (nor
torch, nor Ray Data) until a job of its kind runs, and records a job whose launch config
its recipe refuses as failed, with the reason."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from corral.ray_jobs import INTERNAL_URL_ENV, JOB_KEY_ENV, JOB_TOKEN_ENV
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs import launch
from jobs.report_target import ReportTarget
from jobs.transport import ReportRefused
from tests.job_api import JobApi


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
    target = ReportTarget(database_url=database.url)
    assert launch.run(job_key("t", "gen"), target) is JobStatus.FAILED
    with database.transaction() as session:
        job = JobStore(session).get("gen", tenant="t")
        assert "ValidationError" in (job.error or "")
        assert "pipeline" in (job.error or "")


@pytest.mark.integration
def test_the_entrypoint_reports_over_http_with_the_token_its_environment_gives(
    database: Database, job_api_for: Callable[..., JobApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As under Ray: key, token and URL from the environment, the row read and the
    failure recorded through the internal routes; another job's token reads nothing."""
    key = job_key("t", "gen")
    with database.transaction() as session:
        JobStore(session).create(
            job_uuid="gen", tenant="t", kind=JobKind.SYNTHETIC_DATA_GENERATION, request={}
        )
    api = job_api_for(database)
    monkeypatch.setenv(INTERNAL_URL_ENV, api.url)
    monkeypatch.setenv(JOB_TOKEN_ENV, api.tokens.token_for(job_key("t", "other")))
    with pytest.raises(ReportRefused, match="valid job token"):
        launch.run(key, launch.target_from_environment())
    monkeypatch.setenv(JOB_TOKEN_ENV, api.tokens.token_for(key))
    monkeypatch.setenv(JOB_KEY_ENV, key)
    assert launch.main() == 1
    with database.transaction() as session:
        job = JobStore(session).get("gen", tenant="t")
        assert job.status == JobStatus.FAILED and "ValidationError" in (job.error or "")
