"""Scoped job credentials: the token a Ray job gets instead of the store's URL.

A job's token is `cjt1.` + the url-safe base64 HMAC-SHA256 of its job key under the
server's job-token secret. It names one job and nothing else: the internal routes
(`corral.routes.internal_jobs`) accept it for that job's key only, and it is not an API
key anywhere else. Nothing is stored per token: the server recomputes it to check one,
so a token lives as long as the secret does (docs/job_credentials.md: changing the secret
invalidates every running job's token).

The secret is `CORRAL_JOB_TOKEN_SECRET`, or, unset, a random one made once under
`CORRAL_HOME` (mode 0600, created atomically so that two processes starting together
agree on one secret).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import SecretStr

TOKEN_PREFIX = "cjt1."  # noqa: S105 - a format marker, not a secret
SECRET_FILE = "job_token_secret"  # noqa: S105 - a file name
SECRET_BYTES = 32
MIN_SECRET_LENGTH = 32
# What the MAC covers besides the key: a version, so a later token format never
# verifies as this one.
_CONTEXT = b"corral job token v1\x00"


class JobTokenSettings(Protocol):
    @property
    def home(self) -> Path: ...
    @property
    def job_token_secret(self) -> SecretStr | None: ...


class JobTokens:
    """Makes and checks job tokens under one secret (given, or loaded on first use)."""

    def __init__(self, secret: bytes | Callable[[], bytes]) -> None:
        self._load = secret if callable(secret) else (lambda: secret)
        self._secret: bytes | None = None

    @classmethod
    def from_settings(cls, settings: JobTokenSettings) -> JobTokens:
        configured = settings.job_token_secret
        if configured is not None:
            return cls(configured.get_secret_value().encode())
        path = settings.home / SECRET_FILE
        return cls(lambda: load_or_create_secret(path))

    def _key(self) -> bytes:
        if self._secret is None:
            secret = self._load()
            if len(secret) < MIN_SECRET_LENGTH:
                raise ValueError(f"a job-token secret must be at least {MIN_SECRET_LENGTH} bytes")
            self._secret = secret
        return self._secret

    def token_for(self, job_key: str) -> str:
        mac = hmac.new(self._key(), _CONTEXT + job_key.encode(), hashlib.sha256).digest()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def verify(self, job_key: str, token: str) -> bool:
        """Whether `token` is this job's, compared in constant time."""
        return hmac.compare_digest(self.token_for(job_key).encode(), token.encode())


def load_or_create_secret(path: Path) -> bytes:
    """The secret in `path`, made first if there is none: written whole to a private
    temporary file and linked into place, so no reader ever sees a partial secret and
    of two processes that race, both end up with the one that was linked first."""
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(SECRET_BYTES) + "\n")
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: use theirs
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    secret = path.read_text().strip().encode()
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(f"{path} holds no usable job-token secret (too short)")
    return secret
