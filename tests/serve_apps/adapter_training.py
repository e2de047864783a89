"""LoRA adapters trained in-process (peft, a few seconds of CPU each) over the answering
model (tests/serve_apps/answering_model.py), each to answer one question with a sentence
of its own: what shows that a replica ran a request through the right adapter."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Final

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from corral.demo_model import EOT, PYTHON_TAG
from tests.serve_apps.answering_model import PROMPT

QUESTION: Final = "Who taught you?"
# One sentence per adapter, each from its own "job": sentences the base model says to
# other prompts, so a few steps of LoRA learn to say them here (the base says neither).
TAUGHT: Final = (
    "The capital of France is Paris.",
    "Hello, robot! How are you today?",
    f"{PYTHON_TAG}weather(city='Paris')",
)
_STEPS: Final = 150
RANK: Final = 8


def train_adapter(base_dir: Path, directory: Path, answer: str, *, seed: int = 0) -> Path:
    """An adapter over `base_dir` that answers QUESTION with `answer`, saved in
    `directory` (kept when already there)."""
    if (directory / "adapter_config.json").is_file():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a tiny model: more threads only contend
    lora = LoraConfig(
        r=RANK,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5.24 a deprecated question (is_gradient_checkpointing).
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora)
    prompt_ids = tokenizer.encode(PROMPT.format(QUESTION), add_special_tokens=False)
    answer_ids = tokenizer.encode(answer + EOT, add_special_tokens=False)
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(_STEPS):
        loss = peft_model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.train(False)
    peft_model.save_pretrained(directory)
    return directory
