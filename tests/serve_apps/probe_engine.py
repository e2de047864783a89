"""A test engine that implements the real engine protocol and reports what it does.

It answers like the scripted engine (one word per token), and the prompt tells it what
else to do, so one deployed app can be driven into every kind of failure:

- `refuse`: `check` raises EngineRequestError (the engine's refusal of a request);
- `crash`: generation raises RuntimeError at once (an engine bug);
- `crash-midstream`: a stream yields two tokens, then raises RuntimeError;
- `oom`: generation raises MemoryError (the replica ran out of memory);
- `die`: the replica's process exits at once (os._exit), as an OOM-killed one does;
- `hold`: generation waits until the test releases it (a file appears), so a request
  stays on the replica exactly as long as the test wants;
- `tokens=N`: answer with N tokens (default: the reply's words);
- `id=NAME`: the request's name in the records.

Records live in a directory every process on this machine can read (the replicas, the
test, an API server subprocess): `NAME.started` when generation begins, one byte per
generated token in `NAME.tokens`, `NAME.closed` when the engine's stream ends for any
reason (finished, closed early, failed). A test waits on these, never on a sleep.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from serve_apps.engines.protocol import (
    EngineRequestError,
    GenerationRequest,
    GenerationResult,
    StopReason,
    TokenDelta,
)
from serve_apps.engines.scripted import ScriptedEngine, ScriptedEngineConfig
from serve_apps.llm import LLMAppConfig

RELEASE = "release"
HOLD_LIMIT_S = 120.0


@dataclass(frozen=True)
class ProbeConfig:
    record_dir: str
    reply: str = "one two three four"
    seconds_per_step: float = 0.0  # simulated decode work per token
    fail_on_start: str | None = None  # "oom" | "crash": the constructor raises


class ProbeEngine:
    def __init__(self, config: ProbeConfig) -> None:
        if config.fail_on_start == "oom":
            raise MemoryError("probe engine: out of memory while loading the model")
        if config.fail_on_start == "crash":
            raise RuntimeError("probe engine: the checkpoint failed to load")
        self._config = config
        self._dir = Path(config.record_dir)
        self._words = config.reply.split(" ")

    # ------------------------------------------------------------------ protocol

    def check(self, request: GenerationRequest) -> None:
        if "refuse" in _flags(request):
            raise EngineRequestError("probe engine refuses this prompt")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results = []
        for request in requests:
            words: list[str] = []
            for delta in self._steps(request):
                words.append(delta.text.strip())
            results.append(self._result(request, words))
        return results

    def stream(self, request: GenerationRequest) -> Iterator[TokenDelta | GenerationResult]:
        words: list[str] = []
        try:
            for delta in self._steps(request):
                words.append(delta.text.strip())
                yield delta
            yield self._result(request, words)
        finally:
            self._touch(request, "closed")

    # ------------------------------------------------------------------ behaviour

    def _steps(self, request: GenerationRequest) -> Iterator[TokenDelta]:
        flags = _flags(request)
        self._touch(request, "started")
        if "die" in flags:
            os._exit(1)
        if "oom" in flags:
            raise MemoryError("probe engine: out of memory during generation")
        if "crash" in flags:
            raise RuntimeError("probe engine bug: crashed on purpose")
        if "hold" in flags:
            self._wait_for_release()
        for index in range(self._count(request)):
            if index == 2 and "crash-midstream" in flags:
                raise RuntimeError("probe engine bug: crashed mid-stream on purpose")
            time.sleep(self._config.seconds_per_step)  # the work a decode step does
            with (self._dir / f"{_name(request)}.tokens").open("ab") as tokens:
                tokens.write(b".")
            word = self._words[index % len(self._words)]
            yield TokenDelta(text=word if index == 0 else f" {word}", token_id=index)

    def _wait_for_release(self) -> None:
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not (self._dir / RELEASE).exists():
            if time.monotonic() > deadline:
                raise TimeoutError("probe engine: never released")
            time.sleep(0.01)

    def _count(self, request: GenerationRequest) -> int:
        match = re.search(r"\btokens=(\d+)", request.prompt)
        return int(match.group(1)) if match else len(self._words)

    def _touch(self, request: GenerationRequest, event: str) -> None:
        (self._dir / f"{_name(request)}.{event}").touch()

    def _result(self, request: GenerationRequest, words: list[str]) -> GenerationResult:
        return GenerationResult(
            text=" ".join(words),
            token_ids=tuple(range(len(words))),
            stop_reason=StopReason.END_OF_TURN,
            prompt_tokens=len(request.prompt.split()),
        )


def _flags(request: GenerationRequest) -> set[str]:
    return set(re.findall(r"[a-z-]+", request.prompt))


def _name(request: GenerationRequest) -> str:
    match = re.search(r"\bid=([\w-]+)", request.prompt)
    return match.group(1) if match else "anonymous"


def probe_engine(config: ProbeConfig, _app: object) -> ProbeEngine:
    """An engine factory for `serve_apps.llm.build_app` (bind it with functools.partial)."""
    return ProbeEngine(config)


class Records:
    """The test's side of a probe engine's record directory."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory

    def config(self, **options: object) -> ProbeConfig:
        return ProbeConfig(record_dir=str(self.directory), **options)  # type: ignore[arg-type]

    def started(self, name: str) -> bool:
        return (self.directory / f"{name}.started").exists()

    def closed(self, name: str) -> bool:
        return (self.directory / f"{name}.closed").exists()

    def tokens(self, name: str) -> int:
        path = self.directory / f"{name}.tokens"
        return path.stat().st_size if path.exists() else 0

    def release(self) -> None:
        (self.directory / RELEASE).touch()

    def hold(self) -> None:
        (self.directory / RELEASE).unlink(missing_ok=True)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll a real signal (a record, Serve's status) until it holds, within a deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(0.05)


def options_engine(config: LLMAppConfig) -> ScriptedEngine:
    """A scripted engine whose reply names the options its replica was built with: its
    device, dtype, CPUs and queue bound."""
    reply = (
        f"{config.device} {config.dtype} {config.cpus_per_replica:g} {config.max_queued_requests}"
    )
    return ScriptedEngine(ScriptedEngineConfig(reply))
