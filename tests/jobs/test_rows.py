"""Row checks that run before a job is stored: each problem is named, each good row passes."""

from __future__ import annotations

from typing import Any

import pytest

from jobs.rows import preference_row_problem, sft_row_problem

USER = {"role": "user", "content": "What does Corral train on?"}
ANSWER = {"role": "assistant", "content": "Ray."}
PAIR = {"prompt": [USER], "chosen": "Ray.", "rejected": "Nothing."}


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"dialog": [USER, ANSWER]}, None),
        ({"dialog": [{"role": "system", "content": "Be brief."}, USER, ANSWER, USER]}, None),
        ({}, "dialog must be a non-empty list of messages"),
        ({"dialog": []}, "dialog must be a non-empty list of messages"),
        ({"dialog": "hello"}, "dialog must be a non-empty list of messages"),
        ({"dialog": [USER]}, "dialog has no assistant turn with text: there is nothing to learn"),
        (
            {"dialog": [USER, {"role": "assistant", "content": "  "}]},
            "dialog has no assistant turn with text: there is nothing to learn",
        ),
        ({"dialog": [{"role": "user"}, ANSWER]}, "dialog[0] needs a role and a content"),
        (
            {"dialog": [{"role": "robot", "content": "x"}, ANSWER]},
            "dialog[0] has an unknown role 'robot'",
        ),
        (
            {"dialog": [USER, {"role": "assistant", "content": {"image": "x"}}]},
            "dialog[1]: content must be text (images cannot be trained on here)",
        ),
    ],
)
def test_sft_row_problems_are_named(row: dict[str, Any], problem: str | None) -> None:
    assert sft_row_problem(row) == problem


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (PAIR, None),
        ({"prompt": [USER], "chosen": "a"}, "missing column(s) rejected"),
        ({**PAIR, "prompt": []}, "prompt must be a non-empty list of messages"),
        ({**PAIR, "prompt": [{"role": "user"}]}, "prompt[0] needs a role and a content"),
        ({**PAIR, "prompt": [USER, ANSWER]}, "prompt must end with a user turn, not 'assistant'"),
        (
            {**PAIR, "prompt": [{"role": "user", "content": ["a", "b"]}]},
            "prompt[0]: content must be text (images cannot be trained on here)",
        ),
        ({**PAIR, "chosen": None}, "chosen must be a non-empty string (the assistant's reply)"),
        ({**PAIR, "rejected": ""}, "rejected must be a non-empty string (the assistant's reply)"),
    ],
)
def test_preference_row_problems_are_named(row: dict[str, Any], problem: str | None) -> None:
    assert preference_row_problem(row) == problem
