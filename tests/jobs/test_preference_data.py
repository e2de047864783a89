"""Preference rows to batches, with the demo model's real tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from jobs.preference_data import pad_pairs, tokenize_pair, tokenize_pairs
from jobs.training_data import IGNORE_INDEX

ROW: dict[str, Any] = {
    "prompt": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is Corral?"},
    ],
    "chosen": "Corral fine-tunes Llama models on Ray.",
    "rejected": "No idea.",
}


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> PreTrainedTokenizerBase:
    loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        demo_model_dir, local_files_only=True
    )
    return loaded


def _scored_text(tokenizer: PreTrainedTokenizerBase, labels: list[int]) -> str:
    text: str = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    return text


def test_only_the_reply_and_its_end_of_turn_are_scored(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    pair = tokenize_pair(tokenizer, ROW, max_seq_len=512)
    assert _scored_text(tokenizer, pair.chosen.labels) == ROW["chosen"] + "<|eot_id|>"
    assert _scored_text(tokenizer, pair.rejected.labels) == ROW["rejected"] + "<|eot_id|>"
    # Both sides share the rendered prompt token for token, up to the reply.
    first_scored = next(i for i, t in enumerate(pair.chosen.labels) if t != IGNORE_INDEX)
    assert pair.chosen.input_ids[:first_scored] == pair.rejected.input_ids[:first_scored]
    prompt_text = tokenizer.decode(pair.chosen.input_ids[:first_scored])
    assert prompt_text.endswith(
        "What is Corral?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_pairs_batch_chosen_first_then_rejected(tokenizer: PreTrainedTokenizerBase) -> None:
    other = {**ROW, "prompt": [{"role": "user", "content": "Hi"}], "rejected": "Go away, please."}
    pairs = tokenize_pairs(tokenizer, [ROW, other], max_seq_len=512)
    batch = pad_pairs(pairs, pad_id=0)
    assert batch["input_ids"].shape[0] == 4
    expected = [pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]
    for row, dialog in enumerate(expected):
        size = len(dialog.input_ids)
        assert batch["input_ids"][row, :size].tolist() == dialog.input_ids
        assert batch["attention_mask"][row].sum().item() == size
        assert (batch["labels"][row, size:] == IGNORE_INDEX).all()


def test_a_pair_whose_reply_is_cut_off_is_dropped(tokenizer: PreTrainedTokenizerBase) -> None:
    """At exactly ROW's prompt length nothing of its replies is left; a shorter prompt's
    pair keeps part of each reply and stays."""
    labels = tokenize_pair(tokenizer, ROW, max_seq_len=512).chosen.labels
    prompt_length = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    short = {**ROW, "prompt": [{"role": "user", "content": "Hi"}]}
    kept = tokenize_pairs(tokenizer, [ROW, short], max_seq_len=prompt_length)
    assert len(kept) == 1
    assert 0 < kept[0].chosen.trained_tokens < len(tokenizer.encode(ROW["chosen"]))
    assert kept[0].rejected.trained_tokens > 0
