"""Preference rows to DPO batches: each row renders twice with the chat template, as the
prompt followed by the chosen reply and by the rejected one, and only the reply's tokens
(inside the template's {% generation %} markers) are scored."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from jobs.training_data import TokenizedDialog, pad_batch, tokenize_dialog


@dataclass(frozen=True)
class TokenizedPair:
    chosen: TokenizedDialog
    rejected: TokenizedDialog


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], *, max_seq_len: int
) -> TokenizedPair:
    """The prompt with each reply as the assistant's turn; labels mark the reply's tokens."""
    prompt = [dict(message) for message in row["prompt"]]

    def with_reply(reply: str) -> TokenizedDialog:
        messages = [*prompt, {"role": "assistant", "content": reply}]
        return tokenize_dialog(tokenizer, messages, max_seq_len=max_seq_len)

    return TokenizedPair(chosen=with_reply(row["chosen"]), rejected=with_reply(row["rejected"]))


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Mapping[str, Any]], *, max_seq_len: int
) -> list[TokenizedPair]:
    """Tokenize every row; a pair where `max_seq_len` cut off all of either reply compares
    nothing, so it is dropped."""
    pairs = [tokenize_pair(tokenizer, row, max_seq_len=max_seq_len) for row in rows]
    return [p for p in pairs if p.chosen.trained_tokens > 0 and p.rejected.trained_tokens > 0]


def pad_pairs(batch: Sequence[TokenizedPair], *, pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B sequences, the B chosen first and then the B rejected, so that
    each model scores a batch of pairs in a single forward pass."""
    dialogs = [pair.chosen for pair in batch] + [pair.rejected for pair in batch]
    return pad_batch(dialogs, pad_id=pad_id)
