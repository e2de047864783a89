"""Browser sessions for the jobs dashboard: a browser cannot send a bearer header when it
navigates, so `POST /dashboard/login` takes an API key once and sets a signed cookie.

The cookie names the key's identity (its tenant and a keyed fingerprint of the key, never
the key), carries its issue time and is signed with the server's secret (itsdangerous).
It is honoured only for safe methods on the dashboard and on the read-only job routes the
page reads (`cookie_may_authenticate`): every write still needs the bearer key, and with
SameSite=Strict a cross-site page can neither send the cookie nor act with it. It never
confers operator rights. A key removed from the configuration ends its sessions: the
fingerprint no longer matches any key."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, TimestampSigner, URLSafeTimedSerializer

from corral.config import ApiKey, Settings

COOKIE_NAME = "corral_session"
LOGIN_PATH = "/dashboard/login"
SECRET_FILE = "session_secret"  # noqa: S105 - a file name, not a secret
SAFE_METHODS = frozenset({"GET", "HEAD"})
# The page, its session probe, and the read-only JSON routes it reads.
_COOKIE_PATHS = re.compile(
    r"/dashboard(/session)?|/jobs(/[^/]+(/logs|/metrics)?)?|/post_training/job/artifacts"
)
# Reachable with no credential at all: the sign-in form, signing out, the static files.
_OPEN_PATHS = re.compile(r"/dashboard/(login|logout|static/[^/]+)")
_SALT = "corral.dashboard.session"
_MIN_SECRET_BYTES = 32


def cookie_may_authenticate(method: str, path: str) -> bool:
    """Whether a session cookie may stand in for the bearer key on this request."""
    return method in SAFE_METHODS and _COOKIE_PATHS.fullmatch(path) is not None


def is_open_dashboard_path(path: str) -> bool:
    """The dashboard paths that need no credential."""
    return _OPEN_PATHS.fullmatch(path) is not None


@dataclass(frozen=True)
class Session:
    """Who a valid cookie speaks for. Never an operator: the dashboard only reads."""

    tenant: str


class _ClockSigner(TimestampSigner):
    """itsdangerous's timestamp signer on an injectable clock (tests age a cookie)."""

    def __init__(self, *args: Any, clock: Callable[[], float] = time.time, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock = clock

    def get_timestamp(self) -> int:
        return int(self._clock())


class SessionCookies:
    """Issues and checks dashboard session cookies for one set of keys.

    `secret` signs them; without it the secret is read from (or made once in)
    `secret_path`, only when the first cookie is issued or checked."""

    def __init__(
        self,
        *,
        keys: tuple[ApiKey, ...],
        max_age_s: int,
        secret: bytes | None = None,
        secret_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if secret is None and secret_path is None:
            raise ValueError("a session secret or a file to keep one in is required")
        self._keys = keys
        self.max_age_s = max_age_s
        self._secret = secret
        self._secret_path = secret_path
        self._clock = clock
        self._lock = threading.Lock()
        self._serializer: URLSafeTimedSerializer | None = None
        self._by_fingerprint: dict[str, ApiKey] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionCookies:
        secret = settings.session_secret
        return cls(
            keys=settings.bearer_keys,
            max_age_s=settings.session_max_age_s,
            secret=secret.encode() if secret is not None else None,
            secret_path=settings.home / SECRET_FILE,
        )

    def issue(self, key: ApiKey) -> str:
        """The cookie value for a session of `key` (a key this object was built with)."""
        serializer = self._ready(create=True)
        assert serializer is not None
        return serializer.dumps({"tenant": key.tenant, "key": self._fingerprint(key)})

    def session_for(self, token: str) -> Session | None:
        """The session a cookie value names, or None: tampered, expired, or for a key that
        is no longer configured."""
        serializer = self._ready(create=False)
        if serializer is None:
            return None
        try:
            payload: Any = serializer.loads(token, max_age=self.max_age_s)
        except BadSignature:  # SignatureExpired is one too
            return None
        if not isinstance(payload, dict):
            return None
        key = self._by_fingerprint.get(str(payload.get("key")))
        if key is None or key.tenant != payload.get("tenant"):
            return None
        return Session(tenant=key.tenant)

    def session_in(self, cookie_header: str | None) -> Session | None:
        """The session in a request's `Cookie` header, if any."""
        for part in (cookie_header or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE_NAME and value:
                return self.session_for(value.strip('"'))
        return None

    def _fingerprint(self, key: ApiKey) -> str:
        assert self._secret is not None
        digest = hmac.new(self._secret, b"key:" + key.key.encode(), hashlib.sha256)
        return digest.hexdigest()[:32]

    def _ready(self, *, create: bool) -> URLSafeTimedSerializer | None:
        with self._lock:
            if self._serializer is None:
                if self._secret is None:
                    assert self._secret_path is not None
                    self._secret = _load_secret(self._secret_path, create=create)
                    if self._secret is None:
                        return None
                self._serializer = URLSafeTimedSerializer(
                    self._secret,
                    salt=_SALT,
                    signer=_ClockSigner,
                    signer_kwargs={"clock": self._clock},
                )
                self._by_fingerprint = {self._fingerprint(key): key for key in self._keys}
            return self._serializer


def _load_secret(path: Path, *, create: bool) -> bytes | None:
    """The secret kept in `path`, made there once (0600, published atomically, so two
    processes agree on it) when `create`; None when there is none and not `create`."""
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(_MIN_SECRET_BYTES).encode())
        finally:
            os.close(fd)
        try:
            os.link(draft, path)  # fails if another process published one first: use it
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"{path} must be readable by its owner only (chmod 600)")
    secret = path.read_bytes().strip()
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(f"{path} holds fewer than {_MIN_SECRET_BYTES} bytes of secret")
    return secret
