"""One request to a tool's provider (Brave Search, an OpenAI-compatible Images API), with
the failures the model should be told about as ToolFailed: a timeout, an unreachable
provider, an HTTP error (its message, never our key), a redirect (not followed: the
provider's URL is the operator's, a redirect elsewhere is not), a body over the size cap,
a body that is not a JSON object."""

from __future__ import annotations

import json
from typing import Any, Final

import httpx

from corral.agents.protocols import ToolFailed

_ERROR_DETAIL_CHARS: Final = 300


async def request_json(
    method: str,
    url: str,
    *,
    tool: str,
    headers: dict[str, str],
    timeout_s: float,
    max_bytes: int,
    params: dict[str, str] | None = None,
    json_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The provider's JSON object answer, or ToolFailed saying what went wrong."""
    try:
        # trust_env=False: no proxy or netrc from the API process's environment.
        async with (
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False) as client,
            client.stream(method, url, headers=headers, params=params, json=json_body) as reply,
        ):
            body = bytearray()
            async for chunk in reply.aiter_bytes():  # decoded: a gzip bomb counts in full
                body += chunk
                if len(body) > max_bytes:
                    raise ToolFailed(
                        f"{tool}: the provider's answer is larger than {max_bytes} bytes"
                    )
            status = reply.status_code
            location = reply.headers.get("location", "")
    except httpx.TimeoutException:
        raise ToolFailed(f"{tool}: the provider did not answer within {timeout_s:g} s") from None
    except httpx.HTTPError as error:
        raise ToolFailed(f"{tool}: could not reach the provider ({type(error).__name__})") from None
    if 300 <= status < 400:
        raise ToolFailed(
            f"{tool}: the provider answered with a redirect (HTTP {status} to {location[:200]!r}),"
            " which is not followed"
        )
    if status >= 400:
        raise ToolFailed(f"{tool}: the provider answered HTTP {status}: {_error_detail(body)}")
    try:
        value = json.loads(body)
    except ValueError:
        raise ToolFailed(f"{tool}: the provider's answer is not JSON") from None
    if not isinstance(value, dict):
        raise ToolFailed(f"{tool}: the provider's answer is not a JSON object")
    return value


def _error_detail(body: bytes | bytearray) -> str:
    """The provider's own error message where it gives one (OpenAI's `error.message`,
    Brave's `error.detail`), else the start of the body."""
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("error"), dict):
        error = value["error"]
        for key in ("message", "detail", "code"):
            if isinstance(error.get(key), str):
                return str(error[key])[:_ERROR_DETAIL_CHARS]
    text = body.decode("utf-8", "replace").strip()
    return text[:_ERROR_DETAIL_CHARS] or "no details"
