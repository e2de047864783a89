"""A deterministic engine with no model: it answers every prompt with the same scripted
reply, one word per token, after a configurable delay per step. It implements the same
protocol as the real engine, so Serve behaviour (batching, streaming, scaling, overload)
can be tested and benchmarked without model cost. It is never chosen by configuration:
only code can inject it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from serve_apps.engines.protocol import (
    EngineRequestError,
    GenerationRequest,
    GenerationResult,
    ScoringRequest,
    StopReason,
    TokenDelta,
)


@dataclass(frozen=True)
class ScriptedEngineConfig:
    reply: str = "scripted reply from a fake engine"
    seconds_per_step: float = 0.0  # one decode step, shared by every row in a batch


class ScriptedEngine:
    def __init__(self, config: ScriptedEngineConfig = ScriptedEngineConfig()) -> None:
        self._config = config
        self._words = config.reply.split(" ")

    def _plan(self, request: GenerationRequest) -> tuple[list[str], StopReason]:
        limit = request.sampling.max_tokens
        if 0 < limit < len(self._words):
            return self._words[:limit], StopReason.OUT_OF_TOKENS
        return self._words, StopReason.END_OF_TURN

    def check(self, request: GenerationRequest) -> None:
        if not request.prompt:
            raise EngineRequestError("the prompt is empty")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        plans = [self._plan(r) for r in requests]
        steps = max((len(words) for words, _ in plans), default=0)
        time.sleep(self._config.seconds_per_step * steps)
        return [
            self._result(r, words, reason)
            for r, (words, reason) in zip(requests, plans, strict=True)
        ]

    def stream(self, request: GenerationRequest) -> Iterator[TokenDelta | GenerationResult]:
        words, reason = self._plan(request)
        for index, word in enumerate(words):
            time.sleep(self._config.seconds_per_step)
            yield TokenDelta(
                text=word if index == 0 else f" {word}",
                token_id=index,
                logprob=0.0 if request.sampling.logprobs else None,
            )
        yield self._result(request, words, reason)

    @staticmethod
    def _result(
        request: GenerationRequest, words: list[str], reason: StopReason
    ) -> GenerationResult:
        return GenerationResult(
            text=" ".join(words),
            token_ids=tuple(range(len(words))),
            stop_reason=reason,
            prompt_tokens=len(request.prompt.split()),
            logprobs=tuple(0.0 for _ in words) if request.sampling.logprobs else None,
        )


def scripted_engine(config: ScriptedEngineConfig, _app: object) -> ScriptedEngine:
    """An engine factory for `serve_apps.llm.build_app`: bind it with
    `functools.partial(scripted_engine, ScriptedEngineConfig(...))`."""
    return ScriptedEngine(config)


class ScriptedScoringEngine:
    """A scoring engine with no model: a conversation scores the number of words of its
    last message (so a test can tell which reply was scored), and refuses the empty
    conversation, as the real engine does."""

    def check(self, request: ScoringRequest) -> None:
        if not request.messages:
            raise EngineRequestError("a conversation to score needs at least one message")

    def score(self, requests: Sequence[ScoringRequest]) -> list[float]:
        return [float(len(r.messages[-1].content.split())) for r in requests]


def scripted_engines(config: ScriptedEngineConfig, app: object) -> object:
    """An engine factory for every app kind (a deployer's `engine_factory`): the scripted
    scoring engine for a reward app, the scripted generation engine for any other."""
    from serve_apps.reward import RewardAppConfig

    if isinstance(app, RewardAppConfig):
        return ScriptedScoringEngine()
    return ScriptedEngine(config)
