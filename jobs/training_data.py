"""Dialog rows to training tensors: the chat template renders each dialog, and only the
assistant's tokens (inside the template's {% generation %} markers) carry a loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # what torch's cross entropy (and HF's loss) skips


@dataclass(frozen=True)
class TokenizedDialog:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the token is not the assistant's

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_dialog(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], *, max_seq_len: int
) -> TokenizedDialog:
    """Render one dialog with the chat template and mask everything but the assistant."""
    encoded = tokenizer.apply_chat_template(
        [dict(message) for message in messages],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    if not isinstance(encoded, BatchEncoding):
        raise TypeError(f"apply_chat_template returned {type(encoded).__name__}")
    input_ids: list[int] = list(encoded["input_ids"])[:max_seq_len]
    mask: list[int] = list(encoded["assistant_masks"])[:max_seq_len]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask, strict=True)]
    return TokenizedDialog(input_ids=input_ids, labels=labels)


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_seq_len: int,
    column: str = "dialog",
) -> list[TokenizedDialog]:
    """Tokenize every row's dialog; a row whose assistant turns were all cut off by
    `max_seq_len` would train on nothing, so it is dropped."""
    dialogs = [tokenize_dialog(tokenizer, row[column], max_seq_len=max_seq_len) for row in rows]
    return [dialog for dialog in dialogs if dialog.trained_tokens > 0]


def pad_batch(batch: Sequence[TokenizedDialog], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest dialog; padding is neither attended nor trained."""
    length = max(len(dialog.input_ids) for dialog in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, dialog in enumerate(batch):
        size = len(dialog.input_ids)
        input_ids[row, :size] = torch.tensor(dialog.input_ids)
        labels[row, :size] = torch.tensor(dialog.labels)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
