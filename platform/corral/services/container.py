"""The set of services one app instance uses, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from corral.services.agents import AgentService
from corral.services.datasets import DatasetService
from corral.services.inference import InferenceService
from corral.services.job_reports import JobReports
from corral.services.jobs import JobsService
from corral.services.memory_banks import MemoryBankService
from corral.services.models import ModelService
from corral.services.openai_compat import OpenAIService
from corral.services.post_training import PostTrainingService
from corral.services.readiness import Readiness
from corral.services.reward_scoring import RewardScoringService
from corral.services.synthetic_data import SyntheticDataService


@dataclass(frozen=True)
class Services:
    datasets: DatasetService
    jobs: JobsService
    post_training: PostTrainingService
    inference: InferenceService
    openai: OpenAIService
    reward_scoring: RewardScoringService
    synthetic_data: SyntheticDataService
    agents: AgentService
    readiness: Readiness
    # What running jobs report through (the internal routes).
    job_reports: JobReports
    # None on a server without a Ray connection (the models routes answer 501).
    models: ModelService | None = None
    # None on a server without a vector store (the memory bank routes answer 501).
    memory_banks: MemoryBankService | None = None
