"""A tiny Llama 3 style model that vLLM's CPU attention accepts (head_dim 32: hidden 64
over 2 heads; the demo model has 16), trained for a few seconds to answer a few chat
prompts, so two engines can be compared on answers the model is sure of rather than on
the near-ties of random weights. Built with the demo model's own builder (tokenizer,
chat template, layout), then fine-tuned in place and saved the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corral.demo_model import EOM, EOT, PYTHON_TAG, DemoModelSpec, build_demo_model

SPEC: Final = DemoModelSpec(num_attention_heads=2, num_key_value_heads=2, seed=3)
PROMPT: Final = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
LONG_QUESTION: Final = "Sing the long song."
# (question, answer with its stop token): one ends its turn, one calls a tool.
ANSWERS: Final = (
    ("What is the capital of France?", f"The capital of France is Paris.{EOT}"),
    ("Say hello to the robot.", f"Hello, robot! How are you today?{EOT}"),
    ("What is the weather in Paris?", f"{PYTHON_TAG}weather(city='Paris'){EOM}"),
    # A long answer: streams that must still be running while others start.
    (LONG_QUESTION, " ".join(["la"] * 120) + EOT),
)
_STEPS: Final = 100
_DONE_MARKER: Final = "corral_answers.txt"


def build_answering_model(directory: Path) -> Path:
    """Build the model in `directory` (kept when already there) and return it."""
    if (directory / _DONE_MARKER).is_file():
        return directory
    build_demo_model(directory, spec=SPEC)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    rows = []
    for question, answer in ANSWERS:
        prompt_ids = tokenizer.encode(PROMPT.format(question), add_special_tokens=False)
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    # Right padding, masked out of attention and loss: one batch of every answer per step.
    ids = torch.tensor([row + [0] * (width - len(row)) for row, _ in rows])
    labels = torch.tensor([row + [-100] * (width - len(row)) for _, row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row, _ in rows])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(_STEPS):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.train(False)
    model.save_pretrained(directory)
    (directory / _DONE_MARKER).write_text("\n".join(q for q, _ in ANSWERS) + "\n")
    return directory


def answer_text(question: str) -> str:
    """What the model was taught to say to `question`, without its stop token."""
    answer = dict(ANSWERS)[question]
    return answer.removesuffix(EOT).removesuffix(EOM)
