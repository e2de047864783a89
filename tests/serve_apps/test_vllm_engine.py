"""The vLLM engine on a real local Ray Serve, its replica in the vLLM env (runtime_env
py_executable), against the transformers engine on the same small model: a head_dim-32
model (vLLM's CPU attention needs at least 32) trained to answer a few prompts. One app
for the module: a vLLM replica takes 15-70 s to start on two cores."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_apps.engines.protocol import (
    EngineRequestError,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    StopReason,
    TokenDelta,
)
from serve_apps.engines.transformers_engine import TransformersEngine, TransformersEngineConfig
from serve_apps.llm import LLMAppConfig, build_app
from tests.serve_apps.answering_model import (
    ANSWERS,
    LONG_QUESTION,
    PROMPT,
    answer_text,
)
from tests.serve_apps.vllm_env import vllm_python_or_skip

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Both engines run fp32 on CPU; their kernels differ (vLLM's paged attention, its own
# matmuls), so logprobs agree to rounding, not bit for bit.
LOGPROB_TOLERANCE = 1e-4
TAUGHT = [question for question, _ in ANSWERS if question != LONG_QUESTION]


def ask(question: str, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt=PROMPT.format(question), sampling=SamplingOptions(**({"max_tokens": 64} | sampling))
    )


@pytest.fixture(scope="module")
def vllm_app(serve_instance: None, answering_model_dir: Path) -> Iterator[DeploymentHandle]:
    python = vllm_python_or_skip()
    config = {
        "name": "vllm-answers",
        "model_dir": str(answering_model_dir),
        "engine": "vllm",
        "device": "cpu",
        "vllm_python": str(python),
        "cpus_per_replica": 0.5,
        "max_batch_size": 8,
    }
    app_name = LLMAppConfig.model_validate(config).app_name
    started = time.monotonic()
    handle = serve.run(build_app(config), name=app_name, route_prefix=None)
    print(f"vLLM app RUNNING {time.monotonic() - started:.1f} s after serve.run")
    try:
        yield handle
    finally:
        serve.delete(app_name)


@pytest.fixture(scope="module")
def transformers_engine(answering_model_dir: Path) -> TransformersEngine:
    return TransformersEngine(TransformersEngineConfig(model_dir=answering_model_dir, device="cpu"))


def _stream(handle: DeploymentHandle, request: GenerationRequest) -> list[Any]:
    return list(handle.options(stream=True).stream.remote(request))


@pytest.mark.parametrize("question", TAUGHT)
def test_greedy_answers_match_the_transformers_engine(
    vllm_app: DeploymentHandle, transformers_engine: TransformersEngine, question: str
) -> None:
    request = ask(question, logprobs=True)
    ours: GenerationResult = vllm_app.generate.remote(request).result()
    (reference,) = transformers_engine.generate([request])
    assert ours.text == reference.text == answer_text(question)
    assert ours.token_ids == reference.token_ids  # the stop token included
    assert ours.stop_reason is reference.stop_reason
    assert ours.prompt_tokens == reference.prompt_tokens
    assert ours.logprobs is not None and reference.logprobs is not None
    assert max(abs(a - b) for a, b in zip(ours.logprobs, reference.logprobs, strict=True)) < (
        LOGPROB_TOLERANCE
    )


def test_stop_reasons_and_max_tokens(
    vllm_app: DeploymentHandle, transformers_engine: TransformersEngine
) -> None:
    tool_call = vllm_app.generate.remote(ask("What is the weather in Paris?")).result()
    assert tool_call.stop_reason is StopReason.END_OF_MESSAGE
    assert tool_call.logprobs is None
    for max_tokens in (1, 5):  # the answer is longer: cut short
        request = ask(TAUGHT[0], max_tokens=max_tokens)
        short = vllm_app.generate.remote(request).result()
        (reference,) = transformers_engine.generate([request])
        assert (short.text, short.token_ids) == (reference.text, reference.token_ids)
        assert len(short.token_ids) == max_tokens
        assert short.stop_reason is StopReason.OUT_OF_TOKENS
    # max_tokens <= 0: what the context window leaves.
    whole = vllm_app.generate.remote(ask(LONG_QUESTION, max_tokens=0)).result()
    assert whole.stop_reason is StopReason.OUT_OF_TOKENS
    assert whole.prompt_tokens + len(whole.token_ids) == transformers_engine.context_window


def test_streaming_deltas_join_to_the_text(vllm_app: DeploymentHandle) -> None:
    items = _stream(vllm_app, ask(TAUGHT[1], logprobs=True))
    deltas = [item for item in items if isinstance(item, TokenDelta)]
    result = items[-1]
    assert isinstance(result, GenerationResult)
    assert sum(isinstance(item, GenerationResult) for item in items) == 1
    assert "".join(delta.text for delta in deltas) == result.text == answer_text(TAUGHT[1])
    assert tuple(delta.token_id for delta in deltas) == result.token_ids
    assert tuple(delta.logprob for delta in deltas) == result.logprobs


def test_seeded_sampling_repeats(vllm_app: DeploymentHandle) -> None:
    def sampled(seed: int) -> tuple[int, ...]:
        request = ask(LONG_QUESTION, max_tokens=24, strategy="top_k", temperature=2.0, top_k=50)
        request = GenerationRequest(
            prompt=request.prompt,
            sampling=SamplingOptions(**{**request.sampling.__dict__, "seed": seed}),
        )
        result: GenerationResult = vllm_app.generate.remote(request).result()
        return result.token_ids

    assert sampled(1) == sampled(1)
    assert len({sampled(seed) for seed in (1, 2, 3)}) > 1


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ("", SamplingOptions(), "empty"),
        (PROMPT.format("x " * 600), SamplingOptions(), "leaves no room"),
        (PROMPT.format("hi"), SamplingOptions(top_p=0.0), "top_p"),
        (PROMPT.format("hi"), SamplingOptions(temperature=-1.0), "temperature"),
    ],
)
def test_bad_requests_are_refused(
    vllm_app: DeploymentHandle, prompt: str, sampling: SamplingOptions, message: str
) -> None:
    request = GenerationRequest(prompt=prompt, sampling=sampling)
    with pytest.raises(EngineRequestError, match=message):
        vllm_app.generate.remote(request).result()
    with pytest.raises(EngineRequestError, match=message):
        _stream(vllm_app, request)


def test_two_streams_are_served_together(vllm_app: DeploymentHandle) -> None:
    """Continuous batching: a stream that starts while another runs gets its tokens at
    once, interleaved with the first one's, not after it."""
    arrivals: dict[str, list[float]] = {"first": [], "second": []}

    def consume(name: str) -> None:
        for item in vllm_app.options(stream=True).stream.remote(ask(LONG_QUESTION, max_tokens=120)):
            if isinstance(item, TokenDelta):
                arrivals[name].append(time.monotonic())

    threads = [threading.Thread(target=consume, args=(name,)) for name in arrivals]
    threads[0].start()
    while not arrivals["first"]:
        time.sleep(0.005)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=120)
    first, second = arrivals["first"], arrivals["second"]
    assert len(first) == len(second) == 120
    # The second began before the first ended, and they kept alternating meanwhile.
    assert second[0] < first[-1]
    interleaved = sum(1 for t in second if first[0] < t < first[-1])
    assert interleaved >= len(second) // 4, (interleaved, first[-1] - first[0])


def test_an_early_closed_stream_is_aborted_in_the_engine(vllm_app: DeploymentHandle) -> None:
    before = vllm_app.stats.remote().result()["engine"]
    assert before["unfinished_requests"] == 0
    stream = vllm_app.options(stream=True).stream.remote(ask(LONG_QUESTION, max_tokens=0))
    for _, item in zip(range(3), stream, strict=False):
        assert isinstance(item, TokenDelta)
    stream.cancel()
    deadline = time.monotonic() + 30
    while True:
        stats = vllm_app.stats.remote().result()["engine"]
        if stats["aborted_requests"] == before["aborted_requests"] + 1:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    assert stats["unfinished_requests"] == 0
