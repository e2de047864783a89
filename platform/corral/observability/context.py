"""The request (or job) a piece of work is done for, in a context variable: the
middleware opens one per HTTP request, services name the job they touch, and every log
line written meanwhile carries both (`corral.observability.logs`).

The context is one mutable object per request, so a job bound in a sync route (which
FastAPI runs in a worker thread, on a copy of the context) is still seen by the
middleware's own access line afterwards."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass

REQUEST_ID_HEADER = "X-Request-ID"
# A caller's id is kept only if it is a short token that is safe in a header, a log line
# and a label; anything else (long, spaces, quotes, control characters) is replaced.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@dataclass
class WorkContext:
    """What is known about the current piece of work; None where it is not known."""

    request_id: str | None = None
    job_uuid: str | None = None
    job_key: str | None = None


_CURRENT: ContextVar[WorkContext | None] = ContextVar("corral_work_context", default=None)


def current() -> WorkContext | None:
    return _CURRENT.get()


def accepted_request_id(raw: bytes | str | None) -> str:
    """The caller's `X-Request-ID` when it is a short safe token, else a new uuid4 hex."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raw = None
    if raw is not None and _SAFE_REQUEST_ID.fullmatch(raw):
        return raw
    return uuid.uuid4().hex


def open_context(context: WorkContext) -> Token[WorkContext | None]:
    """Make `context` current; returns the token `close_context` takes."""
    return _CURRENT.set(context)


def close_context(token: Token[WorkContext | None]) -> None:
    _CURRENT.reset(token)


@contextmanager
def job_context(*, job_key: str, job_uuid: str | None = None) -> Iterator[WorkContext]:
    """Work on one job outside any request (the reconciler's passes)."""
    context = WorkContext(job_uuid=job_uuid, job_key=job_key)
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def bind_job(*, job_uuid: str, job_key: str | None = None) -> None:
    """Name the job the current request concerns (a no-op outside a request)."""
    context = _CURRENT.get()
    if context is not None:
        context.job_uuid = job_uuid
        if job_key is not None:
            context.job_key = job_key
