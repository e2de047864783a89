"""The `prompt_guard` shield: a sequence classifier (Prompt Guard's benign / injection /
jailbreak) on a `classifier` model, `params.model` or `CORRAL_PROMPT_GUARD_MODEL`.

The last message's text is split into windows of the classifier's length (its
`max_tokens`, less a small margin, overlapping by an eighth, counted in the model's own
tokens through `token_spans`), so an injection deep inside a long document is read like
one at its start. The message violates when any window's injection or jailbreak
probability reaches `params.threshold` (default 0.9, Prompt Guard's); the violation names
the label with the highest such probability."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve.handle import DeploymentHandle

from corral.agents.shields.llama_guard_format import message_text
from corral.api.agentic_system import SafetyViolation
from corral.api.common import Message
from corral.errors import InvalidRequest
from corral.services.inference import ModelRouter
from corral.services.model_calls import classifier_info, classifier_token_spans, classify
from serve_apps.engines.protocol import ClassifierInfo

LABELS = ("benign", "injection", "jailbreak")
FLAGGED = ("injection", "jailbreak")
REFUSAL = (
    "I can't act on that message: it looks like an attempt to override this assistant's "
    "instructions."
)


class PromptGuardParams(BaseModel):
    """A `prompt_guard` shield's params."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(default=None, min_length=1, max_length=128)
    threshold: float = Field(default=0.9, gt=0.0, le=1.0)


def windows(spans: Sequence[tuple[int, int]], *, size: int, overlap: int) -> list[tuple[int, int]]:
    """Character ranges of consecutive windows of at most `size` tokens (by their
    spans), each starting `size - overlap` tokens after the last; all of the text is in
    some window."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError("a window needs size >= 1 and 0 <= overlap < size")
    found = []
    step = size - overlap
    for first in range(0, max(len(spans), 1), step):
        chunk = spans[first : first + size]
        if not chunk:
            break
        found.append((chunk[0][0], chunk[-1][1]))
        if first + size >= len(spans):
            break
    return found


def window_size(max_tokens: int) -> tuple[int, int]:
    """Tokens per window and overlap for a classifier that reads `max_tokens`: a margin
    of a sixteenth, because a window's text tokenized alone may take a token or two more
    than its spans did."""
    size = max(1, max_tokens - max(2, max_tokens // 16))
    return size, size // 8


class PromptGuardShield:
    """Judges the last message with a classifier on `model`, for `tenant`."""

    shield_type = "prompt_guard"

    def __init__(self, *, router: ModelRouter, tenant: str, model: str, threshold: float) -> None:
        self._router = router
        self._tenant = tenant
        self._model = model
        self._threshold = threshold
        self._info: ClassifierInfo | None = None

    @property
    def model(self) -> str:
        return self._model

    async def verify(self) -> ClassifierInfo:
        """The classifier's labels and window, read once: InvalidRequest (422) unless its
        labels are benign, injection and jailbreak (in any order and case)."""
        if self._info is None:
            info = await classifier_info(self._handle())
            labels = [label.lower() for label in info.labels]
            if sorted(labels) != sorted(LABELS):
                raise InvalidRequest(
                    f"prompt_guard: model {self._model!r} has labels {list(info.labels)[:10]}, "
                    f"not {', '.join(LABELS)}"
                )
            self._info = ClassifierInfo(labels=tuple(labels), max_tokens=info.max_tokens)
        return self._info

    async def check(self, messages: Sequence[Message]) -> SafetyViolation | None:
        if not messages:
            return None
        text = message_text(messages[-1])
        if not text.strip():
            return None
        info = await self.verify()
        handle = self._handle()
        size, overlap = window_size(info.max_tokens)
        ranges = windows(await classifier_token_spans(handle, text), size=size, overlap=overlap)
        rows = await classify(handle, [text[start:end] for start, end in ranges])
        worst: tuple[float, str, tuple[int, int]] | None = None
        for span, row in zip(ranges, rows, strict=True):
            for label in FLAGGED:
                score = row[info.labels.index(label)]
                if score >= self._threshold and (worst is None or score > worst[0]):
                    worst = (score, label, span)
        if worst is None:
            return None
        score, label, (start, end) = worst
        return SafetyViolation(
            violation_type=label,
            details=(
                f"prompt_guard: characters {start}-{end} of the last message score "
                f"{label} {score:.3f}, at or above the threshold {self._threshold}"
            ),
            suggested_user_response=REFUSAL,
        )

    def _handle(self) -> DeploymentHandle[Any]:
        return self._router.handle_for(tenant=self._tenant, model=self._model, kind="classifier")
