"""Where a job reports (pydantic only: every recipe's config carries one, and the API
validates configs without it).

Every job Ray runs reports to the API's internal routes with its own token
(docs/job_credentials.md): `jobs.launch` makes that target from the environment the
launcher set, and it reaches the Train workers inside the recipe's config, never
through anything stored. A recipe run in-process by a test or a benchmark that holds
the database may report to the store directly (`database_url`); the launcher never
gives a job that."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

# How long a job keeps retrying a report while the API does not answer (a restart, a
# rolling upgrade) before it gives up on the call.
DEFAULT_RETRY_S = 600.0


class ReportTarget(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    internal_url: str | None = None
    token: SecretStr | None = None
    database_url: str | None = None
    retry_s: float = Field(default=DEFAULT_RETRY_S, gt=0)

    @model_validator(mode="after")
    def _one_way(self) -> Self:
        over_http = self.internal_url is not None or self.token is not None
        if over_http == (self.database_url is not None):
            raise ValueError("report either to internal_url with a token, or to database_url")
        if over_http and (self.internal_url is None or self.token is None):
            raise ValueError("reporting over HTTP needs both internal_url and token")
        return self
