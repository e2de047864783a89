"""The `llama_guard` shield: Llama Guard 3 run through the inference path.

The conversation becomes Llama Guard 3's prompt (`llama_guard_format`), sent as one user
turn of the Llama 3.1 chat format to an `llm` model (the shield's `params.model`, else
`CORRAL_LLAMA_GUARD_MODEL`), decoded greedily for a few tokens. `safe` passes; `unsafe`
with category codes is a violation whose `violation_type` is the codes (e.g. "S1" or
"S1,S10"). Codes the agent excluded are dropped from the answer (a model may still name
them); when none is left the message passes.

An answer that is neither is not a pass: the shield cannot tell, so the turn fails with
ShieldFailed (503), the same as an unreachable guard model. A guard that cannot answer
must never let a message through silently."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corral.agents.shields.errors import ShieldFailed
from corral.agents.shields.llama_guard_format import (
    CATEGORIES,
    UnreadableVerdict,
    guard_prompt,
    parse_verdict,
)
from corral.api.agentic_system import SafetyViolation
from corral.api.common import Message
from corral.llama3 import format_chat
from corral.services.inference import ModelRouter
from corral.services.model_calls import generate
from serve_apps.engines.protocol import GenerationRequest, SamplingOptions

# `unsafe\nS1,S2,...,S14` is at most a few dozen tokens; more is not an answer.
MAX_ANSWER_TOKENS = 24
REFUSAL = "I can't help with that request, as it goes against this assistant's safety policy."


class LlamaGuardParams(BaseModel):
    """A `llama_guard` shield's params."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, min_length=1, max_length=128)
    excluded_categories: list[str] = Field(default_factory=list, max_length=len(CATEGORIES))

    @field_validator("excluded_categories")
    @classmethod
    def _known_codes(cls, codes: list[str]) -> list[str]:
        unknown = [code for code in codes if code not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown categories {unknown[:5]} (Llama Guard 3 has S1-S14)")
        if set(codes) == set(CATEGORIES):
            raise ValueError("excluding every category would let every message pass")
        return codes


class LlamaGuardShield:
    """Judges the last message with Llama Guard on `model`, for `tenant`."""

    shield_type = "llama_guard"

    def __init__(
        self, *, router: ModelRouter, tenant: str, model: str, excluded: Sequence[str] = ()
    ) -> None:
        self._router = router
        self._tenant = tenant
        self._model = model
        self._excluded = tuple(excluded)

    @property
    def model(self) -> str:
        return self._model

    def prompt(self, messages: Sequence[Message]) -> str:
        """The exact prompt the guard model reads (special tokens included)."""
        text = guard_prompt(messages, excluded=self._excluded)
        return format_chat([Message(role="user", content=text, tool_calls=[], tool_responses=[])])

    async def check(self, messages: Sequence[Message]) -> SafetyViolation | None:
        if not any(message.role != "system" for message in messages):
            return None  # nothing from the user or the agent to judge
        handle = self._router.handle_for(tenant=self._tenant, model=self._model, kind="llm")
        request = GenerationRequest(
            prompt=self.prompt(messages), sampling=SamplingOptions(max_tokens=MAX_ANSWER_TOKENS)
        )
        result = await generate(handle, request)
        try:
            verdict = parse_verdict(result.text)
        except UnreadableVerdict as exc:
            raise ShieldFailed(
                f"llama_guard on model {self._model!r} gave no verdict ({exc}); the message "
                "was not judged"
            ) from None
        codes = [code for code in verdict.categories if code not in self._excluded]
        if verdict.safe or not codes:
            return None
        names = ", ".join(f"{code} ({CATEGORIES[code]})" for code in codes)
        return SafetyViolation(
            violation_type=",".join(codes),
            details=f"llama_guard: the last message is unsafe: {names}",
            suggested_user_response=REFUSAL,
        )
