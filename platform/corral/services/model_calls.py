"""Calls to a model's Serve app through its handle, shared by the spec's inference
service and the OpenAI-compatible one: Serve's refusals and the engine's input errors
become domain errors, and a stream closed early cancels its generation."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from corral.errors import InvalidRequest, Overloaded
from serve_apps.engines.protocol import GenerationRequest, GenerationResult, TokenDelta

T = TypeVar("T")


async def call_model(awaitable: Awaitable[T]) -> T:
    """Await a handle call, turning Serve's refusals and engine input errors into domain
    errors."""
    try:
        return await awaitable
    except BackPressureError as exc:
        raise Overloaded(f"the model is at capacity, try again shortly ({exc})") from None
    except RayTaskError as exc:
        if isinstance(exc.cause, ValueError):
            raise InvalidRequest(str(exc.cause)) from None
        raise


async def generate(handle: DeploymentHandle[Any], request: GenerationRequest) -> GenerationResult:
    result: GenerationResult = await call_model(handle.generate.remote(request))
    return result


async def stream_generation(
    handle: DeploymentHandle[Any], request: GenerationRequest
) -> AsyncGenerator[TokenDelta | GenerationResult, None]:
    """The engine's stream; closing this generator early cancels the generation."""
    stream = handle.options(stream=True).stream.remote(request)
    assert isinstance(stream, DeploymentResponseGenerator)
    iterator = stream.__aiter__()
    finished = False
    try:
        while True:
            try:
                item = await call_model(iterator.__anext__())
            except StopAsyncIteration:
                finished = True
                return
            yield item
    finally:
        if not finished:
            stream.cancel()  # type: ignore[no-untyped-call]
