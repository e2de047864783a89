"""Bearer-key authentication: an ASGI middleware that puts the caller's tenant, and
whether the caller is an operator, on the request scope, so every route — spec, docs and
future mounts alike — is covered.

An operator key acts as its own tenant (`tenant:key` in CORRAL_OPERATOR_KEYS, a bare key
is the default tenant) on every route; operator actions (scaling a shared model, the
cluster-wide model list) also need `operator`. Without any keys configured (the local,
single-user default) the caller is the default tenant and an operator.

`/internal/` is the one exception: running jobs' routes, where no key counts and each
route checks the job's own token (corral.job_tokens); a job token is not a key, so it
opens no other route."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from corral.config import DEFAULT_TENANT, ApiKey
from corral.sessions import (
    LOGIN_PATH,
    SessionCookies,
    cookie_may_authenticate,
    is_open_dashboard_path,
)

# Probes carry no key: liveness learns nothing but "up", readiness which backend is down
# (corral.routes.ops). /metrics is not open: it needs an operator key.
OPEN_PATHS = frozenset({"/health", "/ready"})
# Running jobs' own routes (corral.routes.internal_jobs): no API key opens them, with or
# without keys configured; each route checks the job's token for the job in its path.
INTERNAL_PREFIX = "/internal/"


def key_for(keys: tuple[ApiKey, ...], authorization: str | None) -> ApiKey | None:
    """The key in an `Authorization: Bearer` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    token_bytes = token.strip().encode()
    found = None
    for key in keys:  # compare against every key so timing does not reveal which matched
        if hmac.compare_digest(key.key.encode(), token_bytes):
            found = key
    return found


def tenant_for(keys: tuple[ApiKey, ...], authorization: str | None) -> str | None:
    """The tenant whose key is in an `Authorization: Bearer` header, or None."""
    key = key_for(keys, authorization)
    return key.tenant if key is not None else None


class BearerAuthMiddleware:
    """`sessions`, when given, lets the dashboard's session cookie stand in for the
    bearer key on the few safe requests `corral.sessions` names (never as an operator)."""

    def __init__(
        self, app: ASGIApp, *, keys: tuple[ApiKey, ...], sessions: SessionCookies | None = None
    ) -> None:
        self.app = app
        self.keys = keys
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if str(scope.get("path", "")).startswith(INTERNAL_PREFIX):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            state["tenant"], state["operator"] = None, False
            await self.app(scope, receive, send)
            return
        if not self.keys:
            state["tenant"], state["operator"] = DEFAULT_TENANT, True
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"authorization")
        key = key_for(self.keys, raw.decode("latin-1") if raw else None)
        tenant = key.tenant if key is not None else self._session_tenant(scope, headers)
        path: str = scope.get("path", "")
        if tenant is None and path not in OPEN_PATHS and not is_open_dashboard_path(path):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            elif path == "/dashboard" and scope.get("method") in ("GET", "HEAD"):
                await _to_login(send)
            else:
                await _unauthorized(send)
            return
        state["tenant"] = tenant
        state["operator"] = key is not None and key.operator
        await self.app(scope, receive, send)

    def _session_tenant(self, scope: Scope, headers: dict[bytes, bytes]) -> str | None:
        if self.sessions is None or scope["type"] != "http":
            return None
        if not cookie_may_authenticate(scope.get("method", ""), scope.get("path", "")):
            return None
        cookie = headers.get(b"cookie")
        session = self.sessions.session_in(cookie.decode("latin-1") if cookie else None)
        return session.tenant if session is not None else None


async def _to_login(send: Send) -> None:
    """A browser that opens the dashboard without a session goes to the sign-in form."""
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", LOGIN_PATH.encode()),
                (b"content-length", b"0"),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def _unauthorized(send: Send) -> None:
    body = json.dumps(
        {"error": {"code": "unauthorized", "message": "a valid bearer key is required"}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="corral"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
