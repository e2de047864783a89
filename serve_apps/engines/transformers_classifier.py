"""The default classification engine: a transformers sequence-classification model (Prompt
Guard's DeBERTa, or any `AutoModelForSequenceClassification` directory) on CPU or GPU.

Text is classified raw, as the model was trained: no chat template, the tokenizer's own
special tokens added (BOS for a Llama tokenizer, [CLS]/[SEP] for DeBERTa). A batch is
right-padded with an attention mask; a decoder head pools at each row's last real token
through `config.pad_token_id`, which is set to the tokenizer's pad token, so a batched
row equals the row alone up to floating-point. The answer is the softmax over the head's
logits, in label-id order (`config.id2label`).

`info.max_tokens` counts text tokens only: the model's positions less the special tokens
the tokenizer adds, so a caller that splits text into windows of that many tokens (as
`token_spans` counts them) never exceeds the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from serve_apps.engines.protocol import ClassifierInfo, EngineRequestError
from serve_apps.engines.transformers_engine import resolve_placement

# Tokenizers without a real limit report this sentinel as model_max_length.
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class TransformersClassifierEngineConfig:
    model_dir: Path
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or float32 | bfloat16 | float16


class TransformersClassifierEngine:
    """Classifies raw text with a sequence-classification model from a local directory."""

    def __init__(self, config: TransformersClassifierEngineConfig) -> None:
        device, dtype = resolve_placement(config.device, config.dtype)
        tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
        if not tokenizer.is_fast:
            raise ValueError(f"the tokenizer in {config.model_dir} has no offsets (not a fast one)")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {config.model_dir} has no pad token")
        tokenizer.padding_side = "right"
        model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
            config.model_dir, dtype=dtype, local_files_only=True
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        torch.nn.Module.to(model, device)
        self._model = model.train(False)
        self._tokenizer: PreTrainedTokenizerBase = tokenizer
        self._device = torch.device(device)
        id2label = {int(i): str(label) for i, label in (model.config.id2label or {}).items()}
        if not id2label or sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"the model in {config.model_dir} does not name each label's id")
        positions = getattr(model.config, "max_position_embeddings", None)
        limits = [int(positions)] if positions else []
        if tokenizer.model_max_length < _NO_LIMIT:
            limits.append(int(tokenizer.model_max_length))
        if not limits:
            raise ValueError(f"the model in {config.model_dir} states no maximum length")
        self._info = ClassifierInfo(
            labels=tuple(id2label[i] for i in sorted(id2label)),
            max_tokens=min(limits) - tokenizer.num_special_tokens_to_add(),
        )

    @property
    def info(self) -> ClassifierInfo:
        return self._info

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        offsets = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        return [(int(start), int(end)) for start, end in offsets]

    def check(self, text: str) -> None:
        if not text.strip():
            raise EngineRequestError("there is no text to classify")
        count = len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        if count > self._info.max_tokens:
            raise EngineRequestError(
                f"the text is {count} tokens, longer than the classifier's window of "
                f"{self._info.max_tokens}: split it into windows first"
            )

    def classify(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        for text in texts:
            self.check(text)
        batch = self._tokenizer(list(texts), padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits = self._model(
                input_ids=batch["input_ids"].to(self._device),
                attention_mask=batch["attention_mask"].to(self._device),
            ).logits
        probabilities: list[list[float]] = logits.float().softmax(dim=-1).cpu().tolist()
        return probabilities
