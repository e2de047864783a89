"""Tiny reward models on disk for tests: a `LlamaForSequenceClassification` with the demo
model's tokenizer (so its chat template and pad token), seeded, so equal arguments build
identical weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

# The demo model's tokenizer, as `corral.demo_model` saves it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_reward_model(
    demo_model_dir: Path,
    destination: Path,
    *,
    labels: Sequence[str] = ("reward",),
    seed: int = 0,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
) -> Path:
    """A reward model in `destination` with one head output per label (bench/reward.py
    asks for a larger one, so that batching has compute to share)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    demo = json.loads((demo_model_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=demo["vocab_size"],
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=demo["max_position_embeddings"],
        bos_token_id=demo["bos_token_id"],
        eos_token_id=demo["eos_token_id"],
        pad_token_id=demo["pad_token_id"],
    )
    # LlamaConfig's signature does not name the head's labels: set them on the config.
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]
        # A freshly made head is near zero; widen it so scores differ visibly.
        torch.nn.init.normal_(model.score.weight, std=1.0)
    destination.mkdir(parents=True)
    model.save_pretrained(destination, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(demo_model_dir / name, destination / name)
    return destination
