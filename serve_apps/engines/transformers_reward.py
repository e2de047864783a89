"""The default scoring engine: a transformers sequence-classification model (a reward
model's head over a causal LM) on CPU or GPU.

Each conversation is rendered with the tokenizer's own chat template (exactly what
`tokenizer.apply_chat_template(messages, tokenize=False)` gives, special tokens
included, so it is tokenized without adding any), a batch is right-padded with the
tokenizer's pad token and an attention mask, and the head's logits are read at each
row's last real token: transformers' sequence-classification pooling finds that token
through `config.pad_token_id`, which this engine sets to the tokenizer's pad token.
Right padding keeps each row's positions those of the row alone, so a batched score
equals the unbatched one up to floating-point.

One label: the score is its logit. Several labels (a multi-attribute head, as NVIDIA's
Nemotron reward models have): the score is the sum of weight x logit over the labels
`score_weights` names (by `config.id2label`); several labels without weights is a
configuration error, since no one sum would be the obvious one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from serve_apps.engines.labels import label_weights
from serve_apps.engines.protocol import EngineRequestError, ScoringRequest
from serve_apps.engines.transformers_engine import resolve_placement

# The roles the chat templates Corral serves take (the spec's; "tool" is rendered as
# Llama 3.1's "ipython" by the template itself).
ROLES: Final = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class TransformersRewardEngineConfig:
    model_dir: Path
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or float32 | bfloat16 | float16
    score_weights: Mapping[str, float] | None = None
    max_context: int | None = None  # default: the model's max_position_embeddings


class TransformersRewardEngine:
    """Scores conversations with a sequence-classification model from a local directory."""

    def __init__(self, config: TransformersRewardEngineConfig) -> None:
        device, dtype = resolve_placement(config.device, config.dtype)
        tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {config.model_dir} has no pad token")
        tokenizer.padding_side = "right"
        model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
            config.model_dir, dtype=dtype, local_files_only=True
        )
        # Pooling reads the last token that is not the pad token: it must be this one.
        model.config.pad_token_id = tokenizer.pad_token_id
        torch.nn.Module.to(model, device)
        self._model = model.train(False)
        self._tokenizer: PreTrainedTokenizerBase = tokenizer
        self._device = torch.device(device)
        self._weights = torch.tensor(
            label_weights(_labels(model), config.score_weights),
            dtype=torch.float32,
        )
        self._max_context = config.max_context or int(model.config.max_position_embeddings)

    def check(self, request: ScoringRequest) -> None:
        """EngineRequestError for no messages, a role the template does not take, or a
        conversation longer than the model's context."""
        self._checked_ids(request)

    def score(self, requests: Sequence[ScoringRequest]) -> list[float]:
        """Score a batch together; scores in request order."""
        if not requests:
            return []
        rows = [self._checked_ids(request) for request in requests]
        batch = self._tokenizer.pad(
            {"input_ids": rows}, padding=True, return_attention_mask=True, return_tensors="pt"
        )
        with torch.inference_mode():
            logits = self._model(
                input_ids=batch["input_ids"].to(self._device),
                attention_mask=batch["attention_mask"].to(self._device),
            ).logits
        scores = logits.float().cpu() @ self._weights
        return [float(value) for value in scores]

    def _checked_ids(self, request: ScoringRequest) -> list[int]:
        if not request.messages:
            raise EngineRequestError("a conversation to score needs at least one message")
        for message in request.messages:
            if message.role not in ROLES:
                raise EngineRequestError(
                    f"role {message.role[:50]!r} cannot be scored (roles: "
                    f"{', '.join(sorted(ROLES))})"
                )
        ids = self._tokenizer(
            self.render(request), add_special_tokens=False, return_attention_mask=False
        )["input_ids"]
        if len(ids) > self._max_context:
            raise EngineRequestError(
                f"the conversation is {len(ids)} tokens, longer than the reward model's "
                f"{self._max_context}"
            )
        return list(ids)

    def render(self, request: ScoringRequest) -> str:
        """The conversation as the model's chat template writes it."""
        messages: list[dict[str, Any]] = [
            {"role": message.role, "content": message.content} for message in request.messages
        ]
        try:
            text = self._tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # the template's own raise_exception, a jinja error
            raise EngineRequestError(f"the chat template refused the conversation: {exc}") from None
        assert isinstance(text, str)
        return text


def _labels(model: PreTrainedModel) -> dict[int, str]:
    # transformers types id2label loosely; loaded from config.json its keys are ints.
    return {int(index): str(label) for index, label in (model.config.id2label or {}).items()}
