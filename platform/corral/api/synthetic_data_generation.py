"""Synthetic data generation: sample replies to prompts, score them, keep the best."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from corral.api.common import JsonObject, Message, SpecModel, spec_default
from corral.api.reward_scoring import KScoredPromptGenerations
from jobs.sdg.config import DatasetOutput

FilteringFunction = Literal["none", "random", "top_k", "top_p", "top_k_top_p", "sigmoid"]


class SyntheticDataGenerationRequest(SpecModel):
    """Request to generate synthetic data. A small batch of prompts and a filtering
    function."""

    prompts: list[Message]
    filtering_function: FilteringFunction = Field(
        description="The type of filtering function.", json_schema_extra=spec_default("none")
    )
    reward_scoring: dict[str, Any] | None = None


class SyntheticDataGenerationResponse(SpecModel):
    """Response from the synthetic data generation. Batch of (prompt, response, score)
    tuples that pass the threshold."""

    synthetic_data: list[KScoredPromptGenerations]
    statistics: JsonObject | None = None


class SyntheticDataJobRequest(SyntheticDataGenerationRequest):
    """Corral's job route (not in the spec): the spec's request, run as a job of kind
    `synthetic_data_generation` under a client-chosen `job_uuid` (the same request again
    is the same job; another request under that uuid is a 409), whose output is written
    and registered as the tenant's dataset `output.dataset_id` (default: the job uuid)."""

    job_uuid: str
    output: DatasetOutput = DatasetOutput()
