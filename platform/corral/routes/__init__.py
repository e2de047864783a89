"""FastAPI routers of the Llama Stack draft spec, one module per API area."""

from __future__ import annotations

from fastapi import APIRouter

from corral.routes import (
    agentic_system,
    datasets,
    inference,
    memory_banks,
    post_training,
    reward_scoring,
    synthetic_data_generation,
)


def all_routers() -> list[APIRouter]:
    """Every router of the spec, in the order the app includes them."""
    return [
        agentic_system.router,
        datasets.router,
        inference.router,
        memory_banks.router,
        post_training.router,
        reward_scoring.router,
        synthetic_data_generation.router,
    ]
