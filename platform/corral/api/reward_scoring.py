"""Reward scoring: a reward model scores k generations per dialog."""

from __future__ import annotations

from corral.api.common import Dialog, Message, RewardModel, SpecModel


class DialogGenerations(SpecModel):
    """One dialog and the k candidate replies to score for it."""

    dialog: Dialog
    k_generations: list[Message]


class RewardScoringRequest(SpecModel):
    """Request to score a reward function. A list of prompts and a list of responses per
    prompt."""

    prompt_generations: list[DialogGenerations]
    model: RewardModel


class ScoredMessage(SpecModel):
    message: Message
    score: float


class KScoredPromptGenerations(SpecModel):
    # Corral answers each dialog's last message (`dialog.message`) here.
    prompt: Message
    k_scored_generations: list[ScoredMessage]


class RewardScoringResponse(SpecModel):
    """Response from the reward scoring. Batch of (prompt, response, score) tuples that
    pass the threshold."""

    scored_generations: list[KScoredPromptGenerations]
