"""A deterministic engine with no model: it answers every prompt with the same scripted
reply, one word per token, after a configurable delay per step. A request
with an adapter is answered with `via-<the adapter directory's name>` first. It implements the same
protocol as the real engine, so Serve behaviour (batching, streaming, scaling, overload)
can be tested and benchmarked without model cost. It is never chosen by configuration:
only code can inject it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePath

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
        words = self._words
        if request.adapter is not None:
            # Which adapter the request came with, so a test can tell (its directory).
            words = [f"via-{PurePath(request.adapter.path).name}", *words]
        limit = request.sampling.max_tokens
        if 0 < limit < len(words):
            return words[:limit], StopReason.OUT_OF_TOKENS
        return words, StopReason.END_OF_TURN

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


@dataclass(frozen=True)
class ChatRule:
    """Reply `reply` when the prompt's last turn (the one before the assistant header) is
    from `role` (any role when None) and contains `contains`."""

    contains: str
    reply: str
    role: str | None = None
    stop_reason: StopReason = StopReason.END_OF_TURN


@dataclass(frozen=True)
class ScriptedChatConfig:
    rules: tuple[ChatRule, ...] = ()
    default: str = "scripted answer"
    context_window: int = 4096


_HEADER = "<|start_header_id|>"
_HEADER_END = "<|end_header_id|>"


def last_turn(prompt: str) -> tuple[str, str]:
    """The role and text of a Llama 3 prompt's last turn before its generation header."""
    turns = prompt.split(_HEADER)
    # turns[-1] is the generation header ("assistant<|end_header_id|>\n\n").
    if len(turns) < 3:
        return "", prompt
    role, _, text = turns[-2].partition(_HEADER_END)
    return role, text.strip().removesuffix("<|eot_id|>").removesuffix("<|eom_id|>")


class ScriptedChatEngine:
    """A generation engine for multi-step chat flows: the first rule matching the last
    turn of the prompt picks the reply (a tool call first, an answer once the tool's
    output is the last turn), streamed a word per token. It counts tokens as words, so
    an agent can fit prompts to its `context_window`."""

    def __init__(self, config: ScriptedChatConfig = ScriptedChatConfig()) -> None:
        self._config = config
        self.context_window = config.context_window

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    def _plan(self, request: GenerationRequest) -> tuple[list[str], StopReason]:
        role, text = last_turn(request.prompt)
        reply, reason = self._config.default, StopReason.END_OF_TURN
        for rule in self._config.rules:
            if (rule.role is None or rule.role == role) and rule.contains in text:
                reply, reason = rule.reply, rule.stop_reason
                break
        words = reply.split(" ")
        limit = request.sampling.max_tokens
        if 0 < limit < len(words):
            return words[:limit], StopReason.OUT_OF_TOKENS
        return words, reason

    def check(self, request: GenerationRequest) -> None:
        if not request.prompt:
            raise EngineRequestError("the prompt is empty")
        if self.count_tokens(request.prompt) >= self.context_window:
            raise EngineRequestError(
                f"the prompt leaves no room in the context window of {self.context_window}"
            )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return [ScriptedEngine._result(r, *self._plan(r)) for r in requests]

    def stream(self, request: GenerationRequest) -> Iterator[TokenDelta | GenerationResult]:
        words, reason = self._plan(request)
        for index, word in enumerate(words):
            yield TokenDelta(text=word if index == 0 else f" {word}", token_id=index)
        yield ScriptedEngine._result(request, words, reason)


def scripted_chat_engine(config: ScriptedChatConfig, _app: object) -> ScriptedChatEngine:
    """An engine factory for `serve_apps.llm.build_app`:
    `functools.partial(scripted_chat_engine, ScriptedChatConfig(...))`."""
    return ScriptedChatEngine(config)
