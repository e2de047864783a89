"""OpenAI-compatible routes under `/v1`: HTTP only. Streams are server-sent events of
OpenAI chunks ending with `data: [DONE]`; errors use OpenAI's error shape with Corral's
status codes (the same exception table as every other route).

The routes stay out of the OpenAPI document: it is the Llama Stack spec's, operation for
operation, and OpenAI documents its own API.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

from corral.api.common import Id
from corral.api.openai import (
    ChatCompletion,
    ChatCompletionCreate,
    Completion,
    CompletionCreate,
    Model,
    ModelList,
)
from corral.deps import TenantDep
from corral.errors import CorralError, http_status_for, retry_after_s
from corral.services.openai_compat import OpenAIService

_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "overloaded_error"}


def openai_error_body(
    status: int, message: str, *, code: str, param: str | None = None
) -> dict[str, object]:
    """OpenAI's error object; `code` is Corral's error code."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _corral_error(exc: CorralError) -> JSONResponse:
    status = http_status_for(exc)
    retry_after = retry_after_s(exc)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = openai_error_body(status, exc.message, code=exc.code)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    problems = [
        (".".join(str(part) for part in err.get("loc", ())[1:]), str(err.get("msg", "")))
        for err in exc.errors()
    ]
    summary = "; ".join(f"{where}: {message}" if where else message for where, message in problems)
    body = openai_error_body(
        422,
        f"invalid request: {summary}",
        code="validation_error",
        param=(problems[0][0] or None) if problems else None,
    )
    return JSONResponse(body, status_code=422)


class OpenAIErrorRoute(APIRoute):
    """Answers domain and validation errors in OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _validation_error(exc)
            except CorralError as exc:
                return _corral_error(exc)

        return handle


def openai_service(request: Request) -> OpenAIService:
    """The app's OpenAI-compatible service, built with the other services."""
    return cast(OpenAIService, request.app.state.services.openai)


OpenAIServiceDep = Annotated[OpenAIService, Depends(openai_service)]

router = APIRouter(
    prefix="/v1", tags=["OpenAI"], route_class=OpenAIErrorRoute, include_in_schema=False
)


@router.get("/models")
def list_models(tenant: TenantDep, openai: OpenAIServiceDep) -> ModelList:
    return openai.models(tenant=tenant)


@router.get("/models/{model}")
def retrieve_model(model: Id, tenant: TenantDep, openai: OpenAIServiceDep) -> Model:
    return openai.model(tenant=tenant, model=model)


@router.post("/completions", response_model=Completion)
async def completions(
    body: CompletionCreate, tenant: TenantDep, openai: OpenAIServiceDep
) -> Completion | StreamingResponse:
    if body.stream:
        return await event_stream(openai.completion_stream(tenant=tenant, request=body))
    return await openai.completion(tenant=tenant, request=body)


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionCreate, tenant: TenantDep, openai: OpenAIServiceDep
) -> ChatCompletion | StreamingResponse:
    if body.stream:
        return await event_stream(openai.chat_completion_stream(tenant=tenant, request=body))
    return await openai.chat_completion(tenant=tenant, request=body)


async def event_stream(chunks: AsyncGenerator[BaseModel, None]) -> StreamingResponse:
    """Start the stream before the response: an unknown model, bad input or a full queue
    still gets its status. A domain error after that is sent as an error event, which
    OpenAI's clients raise. Closing the response closes `chunks` (and the generation)."""
    first = await anext(chunks, None)

    async def events() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield _event(first.model_dump_json())
            async for chunk in chunks:
                yield _event(chunk.model_dump_json())
        except CorralError as exc:
            body = openai_error_body(http_status_for(exc), exc.message, code=exc.code)
            yield _event(json.dumps(body))
            return
        finally:
            await chunks.aclose()
        yield _event("[DONE]")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _event(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"
