"""The internal job routes for tests whose Ray jobs report back: a Ray job reaches the
API over HTTP with its own token (docs/job_credentials.md), so a test that runs one
serves an app over its database on a free loopback port (uvicorn in a thread) and gives
the launcher that URL and the app's token secret."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from corral.app import create_app
from corral.config import Settings
from corral.job_tokens import JobTokens
from corral.ray_jobs import RayJobLauncher
from corral.store.db import Database
from tests.api.live_server import live_server


@dataclass(frozen=True)
class JobApi:
    url: str
    tokens: JobTokens

    def launcher(self, jobs_url: str, **extra: object) -> RayJobLauncher:
        """A launcher whose jobs report here."""
        return RayJobLauncher(jobs_url, internal_url=self.url, tokens=self.tokens, **extra)  # type: ignore[arg-type]


@contextmanager
def job_api(database: Database, home: Path, *, tokens: JobTokens | None = None) -> Iterator[JobApi]:
    """An app over `database` (no Ray of its own: it only answers the jobs), served
    until the block ends. Its token secret is `tokens`, else the one under `home`."""
    settings = Settings(home=home)
    tokens = tokens or JobTokens.from_settings(settings)
    app = create_app(settings, database=database, job_tokens=tokens)
    with live_server(app) as url:
        yield JobApi(url=url, tokens=tokens)
