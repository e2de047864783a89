"""The demo guard models answer as trained, and how far they carry to phrasings they
never saw (measured, stated: they are stand-ins, not safety systems)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.demo_guards import (
    HELD_OUT_GUARD,
    HELD_OUT_PROMPT_GUARD,
    PROMPT_GUARD_LABELS,
    _message,
    answers_as_trained,
    classify,
    guard_answers,
    guard_chat_prompt,
    guard_examples,
    load_model,
    prompt_guard_examples,
)

pytestmark = pytest.mark.slow  # the session's guard models take 15-60 s to build here


def test_the_demo_llama_guard_answers_its_training_prompts(demo_llama_guard_dir: Path) -> None:
    model, tokenizer = load_model(demo_llama_guard_dir, causal=True)
    assert all(answers_as_trained(model, tokenizer, guard_examples()))
    answers = guard_answers(
        model, tokenizer, [guard_chat_prompt([_message("user", t)]) for t, _ in HELD_OUT_GUARD]
    )
    expected = ["safe" if c == "safe" else f"unsafe\n{c}" for _, c in HELD_OUT_GUARD]
    right = sum(a == e for a, e in zip(answers, expected, strict=True))
    # Measured at build: 6 of 8 held-out phrasings (a stab misread as S10, a cake as S2).
    assert right >= 5, list(zip(answers, expected, strict=True))
    assert all(a == "safe" or a.startswith("unsafe\nS") for a in answers)  # always a verdict


def test_the_demo_prompt_guard_labels_its_texts(demo_prompt_guard_dir: Path) -> None:
    model, tokenizer = load_model(demo_prompt_guard_dir, causal=False)
    for examples, least in ((prompt_guard_examples(), 1.0), (HELD_OUT_PROMPT_GUARD, 5 / 6)):
        rows = classify(model, tokenizer, [text for text, _ in examples])
        found = [PROMPT_GUARD_LABELS[row.index(max(row))] for row in rows]
        right = sum(f == label for f, (_, label) in zip(found, examples, strict=True))
        assert right / len(examples) >= least, found
