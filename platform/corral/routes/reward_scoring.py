"""Reward scoring route: HTTP only (`corral.services.reward_scoring`)."""

from __future__ import annotations

from fastapi import APIRouter

from corral.api.reward_scoring import RewardScoringRequest, RewardScoringResponse
from corral.deps import RewardScoringServiceDep, TenantDep
from corral.routes.responses import OK

router = APIRouter(tags=["RewardScoring"])


@router.post("/reward_scoring/score", response_description=OK, response_model_exclude_none=True)
async def score(
    body: RewardScoringRequest, tenant: TenantDep, reward_scoring: RewardScoringServiceDep
) -> RewardScoringResponse:
    """Score each dialog's k generations with the reward model (the tenant's own model
    named `model` first, then the server's). Each generation is judged as the last turn
    of its dialog (history, then the dialog's message, then the generation, which must
    be an assistant message); `prompt` in each answer is the dialog's last message
    (`dialog.message`). Answers and scores are in input order."""
    return await reward_scoring.score(tenant=tenant, request=body)
