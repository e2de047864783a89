"""Synthetic data generation route. No generation pipeline is wired in yet: the
operation validates its request, then answers 501 naming the missing capability."""

from __future__ import annotations

from fastapi import APIRouter

from corral.api.synthetic_data_generation import (
    SyntheticDataGenerationRequest,
    SyntheticDataGenerationResponse,
)
from corral.errors import CapabilityUnavailable
from corral.routes.responses import OK

router = APIRouter(tags=["SyntheticDataGeneration"])


@router.post(
    "/synthetic_data_generation/generate",
    response_description=OK,
    response_model_exclude_none=True,
)
def generate(body: SyntheticDataGenerationRequest) -> SyntheticDataGenerationResponse:
    raise CapabilityUnavailable(
        "synthetic_data_generation",
        "no generation pipeline (Ray Data over a generation and a reward engine) is in yet",
    )
