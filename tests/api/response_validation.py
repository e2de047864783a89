"""Every response an API test receives, checked against the app's own OpenAPI document
(platform/corral/openapi.json) while it is read: a JSON body whole, each server-sent
event's `data:` item and each `application/jsonl` line as it arrives. FastAPI validates
only the JSON bodies it builds from a response model; streams and JSON Lines pass
unchecked, and nothing checks error bodies.

The schemas are the document's, read with `jsonschema` (OpenAPI 3.1 schemas are JSON
Schema 2020-12). A stream declared as `application/json` in the document (the spec's
streamed chunk types) is validated event by event against that schema. Operations outside
the document (`/v1`, `/health`) are not checked here: OpenAI's own client checks `/v1`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from starlette import testclient

DOCUMENT_URI = "urn:corral:openapi"


class ResponseSchemaViolation(AssertionError):
    """A response that its operation's documented schema does not allow."""


def _pointer(*parts: str) -> str:
    return "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


class ResponseValidator:
    """Finds the documented schema of a response and validates bodies against it."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self._registry: Registry = Registry().with_resource(DOCUMENT_URI, resource)
        self._templates = [
            (re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$"), path)
            for path in document["paths"]
            if "{" in path
        ]
        self.checked = 0  # bodies and items validated, for tests of this validator

    def _path_template(self, path: str) -> str | None:
        if path in self.document["paths"]:
            return path
        return next((tpl for pattern, tpl in self._templates if pattern.match(path)), None)

    def checker(
        self, method: str, path: str, status: int, content_type: str | None
    ) -> BodyChecker | None:
        """What checks this response's body, or None when its operation is not in the
        document. An undocumented status is itself a violation."""
        template = self._path_template(path)
        operation = (
            self.document["paths"].get(template, {}).get(method.lower()) if template else None
        )
        if operation is None:
            return None
        where = f"{method.upper()} {path} -> {status}"
        responses: dict[str, Any] = operation.get("responses", {})
        key = str(status) if str(status) in responses else "default"
        if key not in responses:
            raise ResponseSchemaViolation(f"{where}: status {status} is not documented")
        content: dict[str, Any] = responses[key].get("content", {})
        media_type = (content_type or "").split(";")[0].strip().lower()
        streamed = media_type == "text/event-stream"
        # The spec declares its streamed chunks under application/json.
        declared = "application/json" if streamed else media_type
        if not content:
            return BodyChecker(self, where, None, kind="empty")
        if declared not in content:
            raise ResponseSchemaViolation(
                f"{where}: content type {media_type or 'none'!r} is not documented "
                f"(documented: {sorted(content)})"
            )
        pointer = "#/" + _pointer("paths", template or path, method.lower(), "responses", key)
        pointer += "/" + _pointer("content", declared, "schema")
        kind = "sse" if streamed else "jsonl" if declared == "application/jsonl" else "json"
        return BodyChecker(self, where, pointer, kind=kind)

    def validate(self, where: str, pointer: str, value: Any) -> None:
        validator = Draft202012Validator(
            {"$ref": DOCUMENT_URI + pointer},
            registry=self._registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )
        error = best_match(validator.iter_errors(value))
        self.checked += 1
        if error is not None:
            at = "/".join(str(part) for part in error.absolute_path) or "(the body)"
            raise ResponseSchemaViolation(
                f"{where}: at {at}: {error.message[:500]}\nbody: {json.dumps(value)[:1000]}"
            )


class BodyChecker:
    """Checks a body fed in chunks: each complete SSE event or JSONL line at once, a JSON
    body (or an empty one) when it ends."""

    def __init__(
        self, validator: ResponseValidator, where: str, pointer: str | None, *, kind: str
    ) -> None:
        self._validator = validator
        self._where = where
        self._pointer = pointer
        self._kind = kind
        self._buffer = b""

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        if self._kind == "sse":
            *events, self._buffer = self._buffer.split(b"\n\n")
            for event in events:
                self._event(event)
        elif self._kind == "jsonl":
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                self._item(line, "a JSON Lines line")

    def finish(self) -> None:
        rest, self._buffer = self._buffer, b""
        if self._kind == "empty":
            if rest:
                raise ResponseSchemaViolation(
                    f"{self._where}: documented without content, got {rest[:200]!r}"
                )
        elif self._kind == "json":
            self._item(rest, "the body")
        elif rest.strip():
            raise ResponseSchemaViolation(
                f"{self._where}: the stream ended inside an item: {rest[:200]!r}"
            )

    def _event(self, event: bytes) -> None:
        data = [
            line.removeprefix(b"data:").removeprefix(b" ")
            for line in event.split(b"\n")
            if line.startswith(b"data:")
        ]
        if data:
            self._item(b"\n".join(data), "an event's data")

    def _item(self, raw: bytes, what: str) -> None:
        if self._kind == "jsonl" and not raw.strip():
            return
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise ResponseSchemaViolation(
                f"{self._where}: {what} is not JSON ({exc}): {raw[:200]!r}"
            ) from None
        assert self._pointer is not None
        self._validator.validate(self._where, self._pointer, value)


class _ValidatingStream(testclient.httpx.SyncByteStream):  # type: ignore[name-defined,misc]
    """The response's byte stream, passed through the checker as the client reads it; a
    stream the client stops reading early is checked as far as it was read."""

    def __init__(self, inner: Any, checker: BodyChecker) -> None:
        self._inner = inner
        self._checker = checker

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._checker.feed(chunk)
            yield chunk
        self._checker.finish()

    def close(self) -> None:
        self._inner.close()


def install(monkeypatch: Any, validator: ResponseValidator) -> None:
    """Make every Starlette TestClient response pass through `validator`."""
    transport = testclient._TestClientTransport
    original = transport.handle_request

    def handle_request(self: Any, request: Any) -> Any:
        response = original(self, request)
        checker = validator.checker(
            request.method,
            request.url.path,
            response.status_code,
            response.headers.get("content-type"),
        )
        if checker is not None:
            response.stream = _ValidatingStream(response.stream, checker)
        return response

    monkeypatch.setattr(transport, "handle_request", handle_request)
