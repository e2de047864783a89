"""Stand-in for the reward-serving branch's module (its `chat_turns` only), so the
synthetic data service imports before that branch is merged; the merge replaces it."""

from __future__ import annotations

from collections.abc import Sequence

from corral.api.common import Message
from corral.llama3.prompt import attachment_text
from serve_apps.engines.protocol import ChatMessage


def chat_turns(messages: Sequence[Message]) -> tuple[ChatMessage, ...]:
    """Spec messages as a chat template takes them: role and text."""
    return tuple(ChatMessage(role=m.role, content=_text(m)) for m in messages)


def _text(message: Message) -> str:
    content = message.content
    parts = content if isinstance(content, list) else [content]
    return "".join(p if isinstance(p, str) else attachment_text(p) for p in parts)
