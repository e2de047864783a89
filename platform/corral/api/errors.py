"""The one shape of every error answer outside `/v1`: `{"error": {"code", "message", ...}}`.

The OpenAPI document gives it as each operation's `default` response, so that a client
(or a fuzzer checking responses against the document) knows what a 4xx or 5xx carries.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Problem(BaseModel):
    """One reason a request did not validate."""

    location: list[str]
    message: str
    type: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    # On a 501: the capability this build lacks.
    capability: str | None = None
    # On a 422 from request validation: each field that failed, and why.
    problems: list[Problem] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_DESCRIPTION = (
    "An error: its status code (see the error table in corral/errors.py), a machine-readable "
    "code and a message."
)
# For a router's routes: FastAPI documents the model under each route's own media type.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {"model": ErrorResponse, "description": _DESCRIPTION}
}
# For a route whose success is not JSON (application/jsonl): its errors still are.
JSON_ERROR_RESPONSE: dict[str, Any] = {
    "description": _DESCRIPTION,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}
