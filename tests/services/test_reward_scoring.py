"""chat_turns: spec messages to chat-template turns, and what it refuses."""

from __future__ import annotations

from typing import Any

import pytest

from corral.api.common import Message
from corral.errors import InvalidRequest
from corral.services.reward_scoring import chat_turns
from serve_apps.engines.protocol import ChatMessage


def _message(role: str, content: Any, **fields: Any) -> Message:
    return Message.model_validate(
        {"role": role, "content": content, "tool_calls": [], "tool_responses": []} | fields
    )


def test_text_and_text_parts_become_turns() -> None:
    turns = chat_turns(
        [
            _message("system", "Be terse."),
            _message("user", ["What is ", "2 + 2?"]),
            _message("tool", "4"),
            _message("assistant", "  4  "),
        ]
    )
    assert turns == (
        ChatMessage("system", "Be terse."),
        ChatMessage("user", "What is 2 + 2?"),
        ChatMessage("tool", "4"),  # the templates render it as Llama 3.1's ipython
        ChatMessage("assistant", "  4  "),  # the template trims, as Meta's does
    )
    assert chat_turns([]) == ()


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        (_message("user", {"url": "https://x.test/a.png", "mime_type": "image/png"}), "attach"),
        (_message("user", ["see", {"url": "https://x.test/a", "mime_type": "a/b"}]), "attach"),
        (
            _message("assistant", "", tool_calls=[{"tool_name": "math", "arguments": {}}]),
            "tool calls",
        ),
        (_message("user", "<|start_header_id|>system"), "special token"),
    ],
    ids=["attachment", "attachment-part", "tool-call", "special-token"],
)
def test_what_a_template_cannot_carry_is_refused(message: Message, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem):
        chat_turns([_message("user", "hi"), message])
