"""The generation engine protocol: formatted prompt in, tokens out.

Prompt formatting (Llama 3.1 roles, tools) and parsing of tool calls happen before and
after the engine, in the control plane; an engine only sees text that already carries
its special tokens."""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class StopReason(enum.StrEnum):
    """Why generation ended, in Llama 3's terms."""

    END_OF_TURN = "end_of_turn"  # <|eot_id|>: the assistant finished its turn
    END_OF_MESSAGE = "end_of_message"  # <|eom_id|>: a tool call waits for its result
    OUT_OF_TOKENS = "out_of_tokens"  # max_tokens (or the context window) ran out


class EngineRequestError(Exception):
    """A request the engine refuses to run (empty or over-long prompt, sampling options
    out of range): the caller's fault, answered 422 with this message. Anything else an
    engine raises is a bug in the engine (500), and a replica that dies or cannot start
    is unavailable (503); so an engine raises this, and only this, for bad requests."""


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens. `temperature == 0` (or strategy "greedy") means greedy."""

    max_tokens: int = 256
    strategy: str = "greedy"  # greedy | top_p | top_k (the spec's sampling strategy)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.strategy == "greedy" or self.temperature <= 0.0


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter a request runs through, over the replica's base model (an engine
    that serves many adapters: vLLM). `adapter_id` is unique per registration (tenant,
    name and the registration itself: a name registered again after a delete is a new
    adapter), never a name alone, since two tenants may both call theirs "mine";
    `tenant` is whose it is (a replica keeps every tenant a fair share of its adapter
    slots); `path` is its directory or storage URI."""

    adapter_id: str
    tenant: str
    path: str

    def key(self) -> str:
        """The adapter as one string (what Serve's multiplexed model id carries)."""
        return json.dumps([self.adapter_id, self.tenant, self.path], separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str) -> AdapterRef:
        adapter_id, tenant, path = json.loads(key)
        return cls(adapter_id=str(adapter_id), tenant=str(tenant), path=str(path))


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str  # fully formatted, special tokens included (the engine adds no BOS)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # None: the base model (or, for an engine built with one adapter merged, that one).
    adapter: AdapterRef | None = None


@dataclass(frozen=True)
class TokenDelta:
    """One step of a stream: the text this token completes (may be "" while a multi-byte
    character is still partial), its id, and its log-probability when asked for."""

    text: str
    token_id: int
    logprob: float | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str  # generated text without the stop token
    token_ids: tuple[int, ...]  # generated ids, stop token included when there was one
    stop_reason: StopReason
    prompt_tokens: int
    logprobs: tuple[float, ...] | None = None  # per generated token, when asked for


@runtime_checkable
class GenerationEngine(Protocol):
    """Generates text for formatted prompts. Implementations are not thread-safe: a Serve
    replica calls them from one batch at a time."""

    def check(self, request: GenerationRequest) -> None:
        """Raise EngineRequestError if `request` can never run (empty or over-long prompt,
        bad sampling options). Called before a request joins a batch, so that one bad
        request cannot fail the others."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run a batch together; results in request order."""
        ...

    def stream(self, request: GenerationRequest) -> Iterator[TokenDelta | GenerationResult]:
        """Yield a TokenDelta per generated token, then exactly one GenerationResult."""
        ...


@dataclass(frozen=True)
class RowStep:
    """What one decode step gave one row of a `DecodeBatch`: its token (as a TokenDelta,
    for a row that streams; None for one that only wants its result), and its result
    when this was its last token (the row has then left the batch)."""

    key: int
    delta: TokenDelta | None
    result: GenerationResult | None = None


class DecodeBatch(Protocol):
    """A running batch that requests join and leave between decode steps (continuous
    batching): a replica's scheduler adds what has arrived before each step and drops
    what its callers no longer want, so nothing waits for a whole batch to end. Driven
    from one thread at a time, like the engine that made it."""

    def join(self, key: int, request: GenerationRequest, *, stream: bool) -> None:
        """Add `request` under `key` before the next step; EngineRequestError (raised
        here, for this request alone) for one that can never run."""
        ...

    def leave(self, key: int) -> None:
        """Drop a row before it finishes (its caller went away), freeing its place."""
        ...

    def step(self) -> list[RowStep]:
        """One token for every row; rows that finished leave the batch."""
        ...

    def __len__(self) -> int:
        """How many rows the batch holds."""
        ...


@runtime_checkable
class BatchDecodingEngine(Protocol):
    """A `GenerationEngine` whose decode loop rows can join between steps (the
    transformers engine). A replica that has one batches streams and unary requests
    together; for any other engine it steps the engine's own streams side by side."""

    def open_batch(self) -> DecodeBatch:
        """A new, empty batch."""
        ...


@runtime_checkable
class AsyncGenerationEngine(Protocol):
    """An engine that schedules requests itself (vLLM's continuous batching: requests
    join and leave the running batch between steps), so a replica hands it each request
    as it arrives, with no batch queue and no engine lock in front. Safe to call
    concurrently from the replica's event loop."""

    def check(self, request: GenerationRequest) -> None:
        """As `GenerationEngine.check`: raise EngineRequestError before any work."""
        ...

    async def generate_one(self, request: GenerationRequest) -> GenerationResult:
        """Run one request to its end (the engine batches it with whatever else runs)."""
        ...

    def stream_one(
        self, request: GenerationRequest
    ) -> AsyncIterator[TokenDelta | GenerationResult]:
        """Yield a TokenDelta per generated token, then exactly one GenerationResult.
        Closing the iterator early aborts the request inside the engine."""
        ...


@runtime_checkable
class TokenCounter(Protocol):
    """An engine that can say how long a prompt is in its own tokens and how many fit:
    what an agent turn fits its history and retrieved context to. Optional: a caller
    that gets no counts relies on `check` refusing an over-long prompt."""

    @property
    def context_window(self) -> int: ...

    def count_tokens(self, prompt: str) -> int: ...


# --- reward scoring ---------------------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    """One message as a chat template takes it: a role (system, user, assistant, tool)
    and its text."""

    role: str
    content: str


@dataclass(frozen=True)
class ScoringRequest:
    """One conversation to judge: the dialog's messages, the last of them the generation
    being scored (an assistant message). The engine renders them with its model's chat
    template, as `AutoModelForSequenceClassification` would be fed in-process."""

    messages: tuple[ChatMessage, ...]


@runtime_checkable
class ScoringEngine(Protocol):
    """Scores conversations with a reward model: one float each, higher is better. Like a
    generation engine, not thread-safe: a replica calls it from one batch at a time."""

    def check(self, request: ScoringRequest) -> None:
        """Raise EngineRequestError if `request` can never be scored (no messages, a
        role the template refuses, longer than the model's context)."""
        ...

    def score(self, requests: Sequence[ScoringRequest]) -> list[float]:
        """Score a batch together; scores in request order."""
        ...


# --- embeddings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingInfo:
    """What a replica's embedding model is: the length of its vectors and the most tokens
    it embeds whole (longer text would be truncated, so `check` refuses it)."""

    dimension: int
    max_tokens: int


@runtime_checkable
class EmbeddingEngine(Protocol):
    """Turns texts into unit-length vectors (cosine similarity is their dot product).
    Not thread-safe: a replica calls it from one batch at a time."""

    @property
    def info(self) -> EmbeddingInfo: ...

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """The [start, end) character span of each token the model sees in `text`, special
        tokens left out: what chunking counts windows in."""
        ...

    def check(self, text: str) -> None:
        """Raise EngineRequestError for text that cannot be embedded whole (empty, or
        longer than `info.max_tokens`)."""
        ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed a batch together; vectors in text order, each of length
        `info.dimension` and unit norm."""
        ...


# --- classification -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierInfo:
    """A sequence classifier's label names (config.json `id2label`, in id order) and the
    most tokens it reads in one window."""

    labels: tuple[str, ...]
    max_tokens: int


@runtime_checkable
class ClassificationEngine(Protocol):
    """Sequence classification (Prompt Guard's benign / injection / jailbreak): softmax
    probabilities per label. Not thread-safe, like every engine."""

    @property
    def info(self) -> ClassifierInfo: ...

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """As `EmbeddingEngine.token_spans`: how the caller splits long text into windows."""
        ...

    def check(self, text: str) -> None:
        """Raise EngineRequestError for empty text or text over `info.max_tokens`."""
        ...

    def classify(self, texts: Sequence[str]) -> list[list[float]]:
        """Probabilities per text, in `info.labels` order, each row summing to 1."""
        ...
