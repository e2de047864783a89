"""FastAPI dependencies as annotated types; the objects themselves are built in `app.py`."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request

from corral.errors import CapabilityUnavailable
from corral.observability.metrics import ApiMetrics
from corral.services.agents import AgentService
from corral.services.container import Services
from corral.services.datasets import DatasetService
from corral.services.inference import InferenceService
from corral.services.jobs import JobsService
from corral.services.models import ModelService
from corral.services.post_training import PostTrainingService
from corral.services.readiness import Readiness
from corral.services.reward_scoring import RewardScoringService
from corral.services.synthetic_data import SyntheticDataService


def _tenant(request: Request) -> str:
    return cast(str, request.state.tenant)


def _operator(request: Request) -> bool:
    """Whether the caller's key is an operator's (see `corral.auth`)."""
    return bool(getattr(request.state, "operator", False))


def _services(request: Request) -> Services:
    return cast(Services, request.app.state.services)


def _datasets(services: Annotated[Services, Depends(_services)]) -> DatasetService:
    return services.datasets


def _post_training(services: Annotated[Services, Depends(_services)]) -> PostTrainingService:
    return services.post_training


def _jobs(services: Annotated[Services, Depends(_services)]) -> JobsService:
    return services.jobs


def _inference(services: Annotated[Services, Depends(_services)]) -> InferenceService:
    return services.inference


def _reward_scoring(services: Annotated[Services, Depends(_services)]) -> RewardScoringService:
    return services.reward_scoring


def _synthetic_data(services: Annotated[Services, Depends(_services)]) -> SyntheticDataService:
    return services.synthetic_data


def _agents(services: Annotated[Services, Depends(_services)]) -> AgentService:
    return services.agents


def _readiness(services: Annotated[Services, Depends(_services)]) -> Readiness:
    return services.readiness


def _metrics(request: Request) -> ApiMetrics:
    return cast(ApiMetrics, request.app.state.metrics)


def _models(services: Annotated[Services, Depends(_services)]) -> ModelService:
    if services.models is None:
        raise CapabilityUnavailable("models", "this server has no Ray connection")
    return services.models


TenantDep = Annotated[str, Depends(_tenant)]
OperatorDep = Annotated[bool, Depends(_operator)]
DatasetServiceDep = Annotated[DatasetService, Depends(_datasets)]
PostTrainingServiceDep = Annotated[PostTrainingService, Depends(_post_training)]
JobsServiceDep = Annotated[JobsService, Depends(_jobs)]
InferenceServiceDep = Annotated[InferenceService, Depends(_inference)]
RewardScoringServiceDep = Annotated[RewardScoringService, Depends(_reward_scoring)]
ModelServiceDep = Annotated[ModelService, Depends(_models)]
SyntheticDataServiceDep = Annotated[SyntheticDataService, Depends(_synthetic_data)]
AgentServiceDep = Annotated[AgentService, Depends(_agents)]
ReadinessDep = Annotated[Readiness, Depends(_readiness)]
ApiMetricsDep = Annotated[ApiMetrics, Depends(_metrics)]
