"""What a Ray job is told about the server (corral.ray_jobs): its key, its own token and
where the internal routes answer, and nothing that opens the store: no database URL and
no password in the runtime_env the Ray dashboard shows (docs/job_credentials.md). The
embedded head, whose processes every job inherits, does not get the server's secrets
either. No Ray runs here: the Jobs SDK client is a fake that keeps what it is given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from corral.config import Settings
from corral.job_tokens import JobTokens
from corral.ray_cluster import SERVER_SECRET_ENV, LocalRayHead
from corral.ray_jobs import (
    INTERNAL_URL_ENV,
    JOB_KEY_ENV,
    JOB_TOKEN_ENV,
    SUBMITTED_AT_ENV,
    RayJobLauncher,
    job_runtime_env,
)
from corral.tenancy import job_key

PASSWORD = "s3cret-pw"
DATABASE_URL = f"postgresql+psycopg://corral:{PASSWORD}@db.internal:5432/corral"
KEY = job_key("alpha", "job-1")


class FakeJobsClient:
    """The JobSubmissionClient calls the launcher makes, kept."""

    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []

    def get_job_info(self, submission_id: str) -> Any:
        raise RuntimeError(f"Job {submission_id} does not exist")

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted.append(kwargs)
        return str(kwargs["submission_id"])


def _launcher(settings: Settings, extra_env: dict[str, str] | None = None) -> RayJobLauncher:
    """Built as `corral serve` builds it."""
    launcher = RayJobLauncher(
        "http://127.0.0.1:8265",
        internal_url="http://127.0.0.1:8321",
        tokens=JobTokens.from_settings(settings),
        extra_env=extra_env,
    )
    launcher._client_instance = FakeJobsClient()  # type: ignore[assignment]
    return launcher


def test_a_jobs_runtime_env_holds_its_key_token_and_url_and_no_store(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url=DATABASE_URL, api_keys="alpha:key-alpha")
    head_env = LocalRayHead(tmp_path).auth_env()
    launcher = _launcher(settings, extra_env=head_env)
    assert launcher.submit(KEY, attempt=1)
    (submitted,) = launcher._client_instance.submitted  # type: ignore[union-attr]
    env = submitted["runtime_env"]["env_vars"]
    assert set(submitted["runtime_env"]) == {"env_vars"}
    assert env[JOB_KEY_ENV] == KEY
    assert env[INTERNAL_URL_ENV] == "http://127.0.0.1:8321"
    assert JobTokens.from_settings(settings).verify(KEY, env[JOB_TOKEN_ENV])
    assert float(env[SUBMITTED_AT_ENV]) > 0
    assert head_env.items() <= env.items()
    everything = json.dumps(submitted)
    for secret in (DATABASE_URL, PASSWORD, "db.internal", "key-alpha", "CORRAL_DATABASE_URL"):
        assert secret not in everything, secret
    secret_file = (tmp_path / "job_token_secret").read_text().strip()
    assert secret_file not in everything  # the token is derived from it, never it


def test_the_runtime_env_function_names_only_what_it_is_given() -> None:
    env = job_runtime_env(
        KEY, token="cjt1.x", internal_url="http://api:8321", extra_env={"A": "1"}, submitted_at=5
    )["env_vars"]
    assert env == {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "A": "1",
        JOB_KEY_ENV: KEY,
        JOB_TOKEN_ENV: "cjt1.x",
        INTERNAL_URL_ENV: "http://api:8321",
        SUBMITTED_AT_ENV: "5.000",
    }


def test_the_embedded_head_does_not_inherit_the_servers_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in SERVER_SECRET_ENV:
        monkeypatch.setenv(name, f"secret-of-{name}")
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    env = LocalRayHead(tmp_path)._head_env()
    assert not SERVER_SECRET_ENV & set(env)
    assert env["CORRAL_HOME"] == str(tmp_path)  # the rest of the environment is kept
    assert {"CORRAL_DATABASE_URL", "CORRAL_JOB_TOKEN_SECRET"} <= SERVER_SECRET_ENV


def test_serve_tells_jobs_the_address_it_listens_on() -> None:
    from corral.cli.serve import internal_url_for

    assert internal_url_for("127.0.0.1", 8321) == "http://127.0.0.1:8321"
    assert internal_url_for("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert internal_url_for("::", 8321) == "http://[::1]:8321"
    assert internal_url_for("[::1]", 8321) == "http://[::1]:8321"
    assert internal_url_for("api.corral.svc", 8321) == "http://api.corral.svc:8321"
    assert Settings(internal_url="http://api:8321/").internal_url == "http://api:8321"
    with pytest.raises(ValueError, match="CORRAL_INTERNAL_URL"):
        Settings(internal_url="api:8321")
