"""The response validator every API test runs under (tests/api/response_validation.py)
fails on what the document does not allow: a JSON body, an SSE item, a JSONL line, a body
where none is documented, an undocumented media type, an item cut off mid-stream."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.api.response_validation import ResponseSchemaViolation, ResponseValidator

DATASET = b'{"columns": {"t": "text"}, "content_url": "data:,x", "metadata": {}}'
CHUNK = b'{"text_delta": "hi"}'


def test_a_json_body_is_checked(response_validator: ResponseValidator) -> None:
    checker = response_validator.checker("GET", "/datasets/get", 200, "application/json")
    assert checker is not None
    checker.feed(DATASET)
    checker.finish()
    bad = response_validator.checker("GET", "/datasets/get", 200, "application/json")
    assert bad is not None
    bad.feed(b'{"columns": {"t": "text"}, "metadata": {}}')
    with pytest.raises(ResponseSchemaViolation, match="content_url"):
        bad.finish()


def test_each_sse_item_is_checked_as_it_arrives(response_validator: ResponseValidator) -> None:
    checker = response_validator.checker(
        "POST", "/inference/chat_completion", 200, "text/event-stream"
    )
    assert checker is not None
    checker.feed(b"data: " + CHUNK + b"\n\ndata: ")
    with pytest.raises(ResponseSchemaViolation, match="text_delta"):
        checker.feed(b'{"text_delta": 3}\n\n')


def test_each_jsonl_line_is_checked(response_validator: ResponseValidator) -> None:
    checker = response_validator.checker(
        "POST", "/inference/batch_completion", 200, "application/jsonl"
    )
    assert checker is not None
    checker.feed(b'{"content": "a", "stop_reason": "finished_ok"}\n')
    with pytest.raises(ResponseSchemaViolation):
        checker.feed(b'{"content": "a", "stop_reason": "sleepy"}\n')


def test_a_body_where_none_is_documented(response_validator: ResponseValidator) -> None:
    checker = response_validator.checker("POST", "/datasets/create", 200, None)
    assert checker is not None
    checker.feed(b"surprise")
    with pytest.raises(ResponseSchemaViolation, match="without content"):
        checker.finish()


def test_errors_are_checked_against_the_error_shape(
    response_validator: ResponseValidator,
) -> None:
    checker = response_validator.checker("GET", "/datasets/get", 404, "application/json")
    assert checker is not None
    checker.feed(b'{"detail": "Not Found"}')
    with pytest.raises(ResponseSchemaViolation, match="error"):
        checker.finish()


def test_an_undocumented_media_type_or_a_cut_item(response_validator: ResponseValidator) -> None:
    with pytest.raises(ResponseSchemaViolation, match="not documented"):
        response_validator.checker("GET", "/datasets/get", 200, "text/plain")
    checker = response_validator.checker("POST", "/inference/completion", 200, "text/event-stream")
    assert checker is not None
    checker.feed(b"data: " + CHUNK[:5])
    with pytest.raises(ResponseSchemaViolation, match="ended inside"):
        checker.finish()


def test_operations_outside_the_document_are_not_checked(
    response_validator: ResponseValidator,
) -> None:
    assert response_validator.checker("GET", "/health", 200, "application/json") is None
    assert response_validator.checker("POST", "/v1/chat/completions", 200, None) is None


def _impostor() -> Starlette:
    """Serves the document's paths with bodies the document does not allow."""

    async def dataset(_request: object) -> Response:
        return JSONResponse({"columns": "not an object"})

    async def stream(_request: object) -> Response:
        async def events():  # type: ignore[no-untyped-def]
            yield b"data: " + CHUNK + b"\n\n"
            yield b'data: {"stop_reason": "finished_ok"}\n\n'

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/datasets/get", dataset),
            Route("/inference/chat_completion", stream, methods=["POST"]),
        ]
    )


def test_every_test_client_response_goes_through_the_validator() -> None:
    """The autouse fixture installs it: a plain TestClient over any app is checked."""
    with TestClient(_impostor()) as client:
        with pytest.raises(ResponseSchemaViolation, match="columns"):
            client.get("/datasets/get")
        with client.stream("POST", "/inference/chat_completion") as response:
            lines = response.iter_lines()
            assert next(lines) == "data: " + CHUNK.decode()
            with pytest.raises(ResponseSchemaViolation, match="stop_reason"):
                list(lines)
