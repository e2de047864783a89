"""What a training row must hold to be learnt from, checked before a job is stored (the
API validates launch configs with the recipes' config classes, jobs/config.py, which
apply these rules) and again when the job validates its stored config. Pure Python: the
API process imports it without torch.

Tokenizing and truncation (a dialog whose assistant turns `max_seq_len` cuts off) can only
be checked by the job, which drops such rows and fails if none are left.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "ipython"})
# Column -> the dataset schema type the API checks a dataset against before it submits.
SFT_COLUMNS = {"dialog": "dialog"}
PREFERENCE_COLUMNS = {"prompt": "dialog", "chosen": "text", "rejected": "text"}


def dialog_problem(messages: Any, *, column: str) -> str | None:
    """Why `messages` is not a dialog the chat template can render, or None."""
    if not isinstance(messages, list) or not messages:
        return f"{column} must be a non-empty list of messages"
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            return f"{column}[{index}] needs a role and a content"
        if message["role"] not in ROLES:
            return f"{column}[{index}] has an unknown role {str(message['role'])[:40]!r}"
        if not isinstance(message["content"], str):
            return f"{column}[{index}]: content must be text (images cannot be trained on here)"
    return None


def sft_row_problem(row: Mapping[str, Any]) -> str | None:
    """Why a row cannot be learnt from by supervised fine-tuning, or None when it can: its
    dialog needs at least one assistant turn with text, since only those carry a loss."""
    dialog = row.get("dialog")
    if (problem := dialog_problem(dialog, column="dialog")) is not None:
        return problem
    assert isinstance(dialog, list)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in dialog):
        return "dialog has no assistant turn with text: there is nothing to learn"
    return None


def preference_row_problem(row: Mapping[str, Any]) -> str | None:
    """Why a row cannot be a preference pair, or None when it can."""
    missing = [column for column in PREFERENCE_COLUMNS if column not in row]
    if missing:
        return f"missing column(s) {', '.join(missing)}"
    prompt = row["prompt"]
    if (problem := dialog_problem(prompt, column="prompt")) is not None:
        return problem
    if prompt[-1]["role"] != "user":
        return f"prompt must end with a user turn, not {prompt[-1]['role']!r}"
    for column in ("chosen", "rejected"):
        if not isinstance(row[column], str) or not row[column].strip():
            return f"{column} must be a non-empty string (the assistant's reply)"
    return None
