"""The two seams of an agent turn: tools the server runs, and shields that judge
messages. Implementations are built from settings in `corral.agents.tools` and
`corral.agents.shields`; tests inject their own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from corral.api.agentic_system import SafetyViolation
from corral.api.common import Message, ShieldConfig, ToolCall, ToolResponse


class ToolFailed(Exception):
    """A tool ran and could not answer (bad arguments, a limit hit, a provider error).
    Its message becomes the tool's response, so the model can read it and recover."""


class ToolUnavailable(Exception):
    """A tool this server cannot run at all (no provider key, no sandbox): agent creation
    is refused with this message (422), and a turn never pretends it ran."""


class Tool(Protocol):
    """A built-in tool the server executes (math, code_interpreter, web_search,
    image_gen)."""

    @property
    def name(self) -> str: ...

    def ensure_available(self) -> None:
        """Raise ToolUnavailable if this tool cannot run on this server."""
        ...

    async def run(self, call: ToolCall) -> ToolResponse:
        """Run one call (its `tool_name` is this tool's). ToolFailed for anything the
        model should be told; other exceptions are bugs."""
        ...


class Shield(Protocol):
    """Judges a conversation (the messages so far, the last being the one to judge)."""

    @property
    def shield_type(self) -> str: ...

    async def check(self, messages: Sequence[Message]) -> SafetyViolation | None:
        """None when the last message passes; otherwise the violation, with
        `violation_type` (e.g. "S1" or "jailbreak"), `details` and
        `suggested_user_response`."""
        ...


class ShieldFactory(Protocol):
    """Builds a shield from the agent's config for a tenant: InvalidRequest (422) when
    the config cannot work (a model-backed shield with no checkpoint configured or
    named, a model the tenant cannot use, bad params)."""

    def build(self, config: ShieldConfig, *, tenant: str) -> Shield: ...

    async def build_checked(self, config: ShieldConfig, *, tenant: str) -> Shield:
        """`build`, plus the checks that need the shield's model to answer (a classifier's
        labels): what agent creation calls, so that a wrong model is a 422 there and
        not a failure of every turn."""
        ...
