"""Inference routes. No generation engine is wired in yet: each operation validates its
request, then answers 501 naming the missing capability."""

from __future__ import annotations

from fastapi import APIRouter

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
from corral.errors import CapabilityUnavailable
from corral.routes.responses import OK, JSONLinesResponse

router = APIRouter(tags=["Inference"])


def _unavailable() -> CapabilityUnavailable:
    return CapabilityUnavailable(
        "inference", "no generation engine (a Ray Serve model app) is wired into this server yet"
    )


@router.post(
    "/inference/completion",
    response_model=CompletionResponse | CompletionResponseStreamChunk,
    response_description=OK,
    response_model_exclude_none=True,
)
def completion(body: CompletionRequest) -> CompletionResponse | CompletionResponseStreamChunk:
    raise _unavailable()


@router.post(
    "/inference/chat_completion",
    response_model=ChatCompletionResponse | ChatCompletionResponseStreamChunk,
    response_description=OK,
    response_model_exclude_none=True,
)
def chat_completion(
    body: ChatCompletionRequest,
) -> ChatCompletionResponse | ChatCompletionResponseStreamChunk:
    raise _unavailable()


@router.post(
    "/inference/batch_completion",
    response_class=JSONLinesResponse,
    responses={200: {"model": CompletionResponse, "description": OK}},
)
def batch_completion(body: BatchCompletionRequest) -> JSONLinesResponse:
    raise _unavailable()


@router.post(
    "/inference/batch_chat_completion",
    response_class=JSONLinesResponse,
    responses={200: {"model": ChatCompletionResponse, "description": OK}},
)
def batch_chat_completion(body: BatchChatCompletionRequest) -> JSONLinesResponse:
    raise _unavailable()
