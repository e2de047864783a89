"""Bearer-key authentication: an ASGI middleware that puts the caller's tenant on the
request scope, so every route — spec, docs and future mounts alike — is covered."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from corral.config import DEFAULT_TENANT, ApiKey

# Liveness probes carry no key and learn nothing but "up".
OPEN_PATHS = frozenset({"/health"})


def tenant_for(keys: tuple[ApiKey, ...], authorization: str | None) -> str | None:
    """The tenant whose key is in an `Authorization: Bearer` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    token_bytes = token.strip().encode()
    tenant = None
    for key in keys:  # compare against every key so timing does not reveal which matched
        if hmac.compare_digest(key.key.encode(), token_bytes):
            tenant = key.tenant
    return tenant


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, *, keys: tuple[ApiKey, ...]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.keys:
            state["tenant"] = DEFAULT_TENANT
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw = headers.get(b"authorization")
        tenant = tenant_for(self.keys, raw.decode("latin-1") if raw else None)
        if tenant is None and scope.get("path") not in OPEN_PATHS:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await _unauthorized(send)
            return
        state["tenant"] = tenant
        await self.app(scope, receive, send)


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
