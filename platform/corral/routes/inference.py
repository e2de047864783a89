"""Inference routes: HTTP only. Streams are server-sent events, one spec chunk per
event; batches are `application/jsonl` in input order."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from corral.api.errors import JSON_ERROR_RESPONSE
from corral.api.inference import (
    BatchChatCompletionRequest,
    BatchCompletionRequest,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseStreamChunk,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseStreamChunk,
)
from corral.deps import InferenceServiceDep, TenantDep
from corral.routes.responses import OK, JSONLinesResponse

router = APIRouter(tags=["Inference"])


async def _sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield b"data: " + chunk.model_dump_json(exclude_none=True).encode() + b"\n\n"


def event_stream(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    return StreamingResponse(
        _sse(chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/inference/completion",
    response_model=CompletionResponse | CompletionResponseStreamChunk,
    response_description=OK,
    response_model_exclude_none=True,
)
async def completion(
    body: CompletionRequest, tenant: TenantDep, inference: InferenceServiceDep
) -> CompletionResponse | CompletionResponseStreamChunk | StreamingResponse:
    if body.stream:
        return event_stream(
            await first_checked(inference.completion_stream(tenant=tenant, request=body))
        )
    return await inference.completion(tenant=tenant, request=body)


@router.post(
    "/inference/chat_completion",
    response_model=ChatCompletionResponse | ChatCompletionResponseStreamChunk,
    response_description=OK,
    response_model_exclude_none=True,
)
async def chat_completion(
    body: ChatCompletionRequest, tenant: TenantDep, inference: InferenceServiceDep
) -> ChatCompletionResponse | ChatCompletionResponseStreamChunk | StreamingResponse:
    if body.stream:
        return event_stream(
            await first_checked(inference.chat_completion_stream(tenant=tenant, request=body))
        )
    return await inference.chat_completion(tenant=tenant, request=body)


@router.post(
    "/inference/batch_completion",
    response_class=JSONLinesResponse,
    responses={
        200: {"model": CompletionResponse, "description": OK},
        "default": JSON_ERROR_RESPONSE,
    },
)
async def batch_completion(
    body: BatchCompletionRequest, tenant: TenantDep, inference: InferenceServiceDep
) -> JSONLinesResponse:
    return JSONLinesResponse(await inference.batch_completion(tenant=tenant, request=body))


@router.post(
    "/inference/batch_chat_completion",
    response_class=JSONLinesResponse,
    responses={
        200: {"model": ChatCompletionResponse, "description": OK},
        "default": JSON_ERROR_RESPONSE,
    },
)
async def batch_chat_completion(
    body: BatchChatCompletionRequest, tenant: TenantDep, inference: InferenceServiceDep
) -> JSONLinesResponse:
    return JSONLinesResponse(await inference.batch_chat_completion(tenant=tenant, request=body))


async def first_checked(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[BaseModel]:
    """Start the stream before the response is: an unknown model, bad input or a full
    queue then still gets its 4xx/503 status instead of a broken 200 stream."""
    first = await anext(chunks)

    async def rest() -> AsyncIterator[BaseModel]:
        yield first
        async for chunk in chunks:
            yield chunk

    return rest()
