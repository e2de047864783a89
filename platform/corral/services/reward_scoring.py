"""Reward scoring: every generation of every dialog is scored by a reward model's Serve
app (`serve_apps.reward`), one call per (dialog, generation) pair.

A pair is the conversation the reward model judges: the dialog's history, its last
message, then the generation (an assistant message), as chat-template turns
(`chat_turns`). A request carries at most MAX_BATCH_ITEMS pairs (422 past that); they
are sent together (`call_each`: at most CALLS_IN_FLIGHT at a time), so the replicas
batch them; scores come back in input order. What a call fails with is mapped as for
inference (`corral.services.model_calls`): the app not deployed or a replica gone is
503, the engine refusing a conversation (too long for the model) is 422."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from ray.serve.handle import DeploymentHandle

from corral.api.common import Content, Message
from corral.api.reward_scoring import (
    KScoredPromptGenerations,
    RewardScoringRequest,
    RewardScoringResponse,
    ScoredMessage,
)
from corral.errors import InvalidRequest
from corral.llama3 import refuse_special_tokens
from corral.services.inference import ModelRouter
from corral.services.model_calls import call_each, call_model, check_batch_size
from serve_apps.engines.protocol import ChatMessage, ScoringRequest


def chat_turns(messages: Sequence[Message]) -> tuple[ChatMessage, ...]:
    """Spec messages as chat-template turns: the role as it is (system, user, assistant,
    tool: the templates served here render "tool" as Llama 3.1's ipython), the content as
    its text (a string, or the text parts of a content list, joined as they are).
    InvalidRequest for what a template's text cannot carry: an attachment, tool calls or
    tool responses, a Llama 3 special token."""
    return tuple(_turn(index, message) for index, message in enumerate(messages))


def _turn(index: int, message: Message) -> ChatMessage:
    where = f"message {index} ({message.role})"
    if message.tool_calls or message.tool_responses:
        raise InvalidRequest(f"{where}: tool calls and tool responses cannot be scored")
    text = _text(message.content, where)
    refuse_special_tokens(text)
    return ChatMessage(role=message.role, content=text)


def _text(content: Content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, str) for part in content):
        return "".join(part for part in content if isinstance(part, str))
    raise InvalidRequest(f"{where}: attachments cannot be scored, only text")


class RewardScoringService:
    def __init__(self, *, router: ModelRouter) -> None:
        self._router = router

    async def score(self, *, tenant: str, request: RewardScoringRequest) -> RewardScoringResponse:
        """Score every generation of every dialog with the reward model `request.model`
        (the tenant's own model of that name first, then the server's); each dialog's
        `prompt` in the answer is its last message (`dialog.message`)."""
        conversations = _conversations(request)  # every 422 before any call
        handle = self._router.handle_for(tenant=tenant, model=request.model, kind="reward")
        scores = iter(await _score_all(handle, conversations))
        return RewardScoringResponse(
            scored_generations=[
                KScoredPromptGenerations(
                    prompt=item.dialog.message,
                    k_scored_generations=[
                        ScoredMessage(message=generation, score=next(scores))
                        for generation in item.k_generations
                    ],
                )
                for item in request.prompt_generations
            ]
        )


def _conversations(request: RewardScoringRequest) -> list[ScoringRequest]:
    """One conversation per (dialog, generation), in input order."""
    check_batch_size(
        sum(len(item.k_generations) for item in request.prompt_generations), "generations"
    )
    conversations = []
    for number, item in enumerate(request.prompt_generations):
        prompt = chat_turns([*item.dialog.message_history, item.dialog.message])
        for index, generation in enumerate(item.k_generations):
            where = f"prompt_generations[{number}].k_generations[{index}]"
            if generation.role != "assistant":
                raise InvalidRequest(
                    f"{where}: a generation is an assistant message (got role {generation.role!r})"
                )
            (turn,) = chat_turns([generation])
            conversations.append(ScoringRequest(messages=(*prompt, turn)))
    return conversations


async def _score_all(
    handle: DeploymentHandle[Any], conversations: list[ScoringRequest]
) -> list[float]:
    async def one(conversation: ScoringRequest) -> float:
        score: float = await call_model(handle.score.remote(conversation))
        return score

    return await call_each([partial(one, conversation) for conversation in conversations])
