"""Reward scoring route. No reward model engine is wired in yet: the operation validates
its request, then answers 501 naming the missing capability."""

from __future__ import annotations

from fastapi import APIRouter

from corral.api.reward_scoring import RewardScoringRequest, RewardScoringResponse
from corral.errors import CapabilityUnavailable
from corral.routes.responses import OK

router = APIRouter(tags=["RewardScoring"])


@router.post("/reward_scoring/score", response_description=OK, response_model_exclude_none=True)
def score(body: RewardScoringRequest) -> RewardScoringResponse:
    raise CapabilityUnavailable(
        "reward_scoring", "no reward model engine (a Ray Serve reward app) is wired in yet"
    )
