"""Response classes for the spec's two kinds of body that FastAPI does not make by itself:
`application/jsonl` lists, and a bare "200 OK" with no content."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

OK = "OK"


class JSONLinesResponse(JSONResponse):
    """A list of JSON values, one per line (`application/jsonl`). It is a JSONResponse so
    that FastAPI documents a route's `responses={200: {"model": ...}}` under this media
    type, as the spec does, instead of `{"type": "string"}`."""

    media_type = "application/jsonl"

    def render(self, content: Any) -> bytes:
        items: Iterable[Any] = content if content is not None else ()
        return b"".join(_line(item) for item in items)


def _line(item: Any) -> bytes:
    if isinstance(item, BaseModel):
        text = item.model_dump_json(exclude_none=True)
    else:
        text = json.dumps(item, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode() + b"\n"


def empty_ok() -> Response:
    """The spec's "200: OK" with no content."""
    return Response(status_code=200)
