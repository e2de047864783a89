"""Synthetic data generation: from the spec's request to a pipeline run (generate k
candidates per prompt through the generating model's Serve app, score them through the
reward model's, filter; jobs/sdg/pipeline.py runs it on Ray Data), answered at once for
small requests or run as a Corral job for large ones.

What is checked before any work (each a 422 naming the field, nothing stored):
`reward_scoring` against `jobs.sdg.config.SyntheticDataSettings` (every parameter named
and bounded, unknown keys refused; absent: the defaults); every prompt a user message
without Llama special tokens; the generating model (kind `llm`) and the reward model
(kind `reward`) known to the tenant (its registered models first, then the file models,
as for inference) and of the right kind; the size: prompts x `num_candidates` at most
CORRAL_SDG_MAX_SYNC_GENERATIONS on `/synthetic_data_generation/generate` (beyond: use
`/synthetic_data_generation/jobs`), at most CORRAL_SDG_MAX_JOB_PROMPTS prompts per job.
Both models' apps must be running (503 with Retry-After otherwise), also for a job, so a
job is not started to fail at its first batch.

A failed stage fails the whole request, naming the stage: 503 when its model is
unavailable (down, overloaded), 500 otherwise; never a silently short answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from corral.api.common import Message
from corral.api.jobs import JobSummary
from corral.api.reward_scoring import KScoredPromptGenerations, ScoredMessage
from corral.api.synthetic_data_generation import (
    SyntheticDataGenerationRequest,
    SyntheticDataGenerationResponse,
    SyntheticDataJobRequest,
)
from corral.config import Settings
from corral.errors import CapabilityUnavailable, InvalidRequest, NotFound, PipelineFailed
from corral.llama3 import format_chat
from corral.services.fine_tuning import job_output
from corral.services.ids import check_id
from corral.services.jobs import JobsService
from corral.services.model_calls import UNAVAILABLE_RETRY_AFTER_S
from corral.services.reward_scoring import chat_turns
from corral.serving.deployer import DEPLOY_RETRY_AFTER_S, AppState, ModelUnavailable
from corral.serving.resolver import ResolvedModel, check_kind
from corral.storage import Storage
from corral.store.jobs import JobKind
from corral.tenancy import job_key
from jobs.sdg.config import (
    PipelineConfig,
    PromptInput,
    PromptTurn,
    SyntheticDataJobConfig,
    SyntheticDataSettings,
)
from jobs.sdg.pipeline import PipelineRun, PromptOutcome, StageFailed, run_pipeline, statistics
from serve_apps.options import ModelKind

CAPABILITY = "synthetic_data_generation"
JOB_ROUTE = "/synthetic_data_generation/jobs"
SDG_KINDS = (JobKind.SYNTHETIC_DATA_GENERATION,)


class ModelNames(Protocol):
    """Model names to models, the tenant's registered models first (the resolver)."""

    def resolve(self, *, tenant: str, model: str, fresh: bool = False) -> ResolvedModel: ...


class AppStates(Protocol):
    """Serve's view of an app (the deployer)."""

    def status(self, app_name: str) -> AppState: ...


# jobs.sdg.pipeline.run_pipeline; a parameter so a test can drive the service's handling
# of outcomes and failures without Ray (the real pipeline is run by the API tests).
PipelineRunner = Callable[[Sequence[PromptInput], PipelineConfig], PipelineRun]


@dataclass(frozen=True)
class SyntheticDataLimits:
    """Server-side bounds and pacing; none of them come from a request."""

    max_sync_generations: int = 256
    max_job_prompts: int = 100_000
    batch_size: int = 8
    max_in_flight: int = 16

    @classmethod
    def from_settings(cls, settings: Settings) -> SyntheticDataLimits:
        return cls(
            max_sync_generations=settings.sdg_max_sync_generations,
            max_job_prompts=settings.sdg_max_job_prompts,
            batch_size=settings.sdg_batch_size,
            max_in_flight=settings.sdg_max_in_flight,
        )


@dataclass(frozen=True)
class PreparedRun:
    """A checked request: the pipeline's prompts and config."""

    prompts: tuple[PromptInput, ...]
    config: PipelineConfig


class SyntheticDataService:
    def __init__(
        self,
        *,
        models: ModelNames | None,
        apps: AppStates | None,
        jobs: JobsService,
        storage: Storage,
        limits: SyntheticDataLimits | None = None,
        runner: PipelineRunner = run_pipeline,
    ) -> None:
        """Without `models` and `apps` (no Ray connection) every request is refused as
        unavailable (501)."""
        self._models = models
        self._apps = apps
        self._jobs = jobs
        self._storage = storage
        self._limits = limits or SyntheticDataLimits()
        self._runner = runner

    # ------------------------------------------------------------------ checking

    def prepare(
        self, *, tenant: str, request: SyntheticDataGenerationRequest, as_job: bool = False
    ) -> PreparedRun:
        """Everything checked that can be before a model is called (see the module doc),
        the size first: the synchronous cap, or with `as_job` the job's."""
        if self._models is None:
            raise CapabilityUnavailable(CAPABILITY, "this server has no Ray connection")
        if not request.prompts:
            raise InvalidRequest("prompts: give at least one prompt")
        settings = _settings(request.reward_scoring)
        self._check_size(len(request.prompts), settings.generation.num_candidates, as_job)
        prompts = tuple(_prompt_input(i, prompt) for i, prompt in enumerate(request.prompts))
        generation_app = self._app_for(tenant, settings.generation.model, "llm", "generation")
        reward_app = self._app_for(tenant, settings.model, "reward", "model")
        config = PipelineConfig(
            filtering_function=request.filtering_function,
            settings=settings,
            generation_app=generation_app,
            reward_app=reward_app,
            batch_size=self._limits.batch_size,
            max_in_flight=self._limits.max_in_flight,
        )
        return PreparedRun(prompts=prompts, config=config)

    def _check_size(self, prompts: int, candidates: int, as_job: bool) -> None:
        if as_job:
            if prompts > self._limits.max_job_prompts:
                raise InvalidRequest(
                    f"prompts: {prompts} prompts, more than one job takes "
                    f"({self._limits.max_job_prompts}); split them over several jobs"
                )
            return
        generations = prompts * candidates
        if generations > self._limits.max_sync_generations:
            raise InvalidRequest(
                f"{prompts} prompts x {candidates} candidates = {generations} generations, "
                f"more than this endpoint answers at once ({self._limits.max_sync_generations}): "
                f"submit it to {JOB_ROUTE} (the same request with a job_uuid), which writes "
                "a dataset"
            )

    def _app_for(self, tenant: str, model: str, kind: ModelKind, field: str) -> str:
        where = f"reward_scoring.{field}" + (".model" if field == "generation" else "")
        assert self._models is not None  # prepare checked
        try:
            resolved = self._models.resolve(tenant=tenant, model=model)
        except NotFound:
            raise InvalidRequest(f"{where}: no model {model[:200]!r} is known here") from None
        try:
            check_kind(resolved, kind)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where}: {exc.message}") from None
        if resolved.adapter is not None:
            # The pipeline's Ray Data actors call the app by name, without the adapter.
            raise InvalidRequest(
                f"{where}: {model[:200]!r} is an adapter riding on {resolved.base_model!r}; "
                "synthetic data generation does not run through such adapters yet"
            )
        return resolved.app_name

    def _check_running(self, config: PipelineConfig) -> None:
        assert self._apps is not None  # prepare checked (both or neither are given)
        for stage, app_name in (
            ("generation", config.generation_app),
            ("reward", config.reward_app),
        ):
            state = self._apps.status(app_name)
            if not state.is_running:
                raise ModelUnavailable(
                    f"the {stage} model's app {app_name!r} is not running "
                    f"({state.status.lower()}); try again once it is",
                    retry_after_s=DEPLOY_RETRY_AFTER_S,
                )

    # ------------------------------------------------------------------ synchronous

    def generate(
        self, *, tenant: str, request: SyntheticDataGenerationRequest
    ) -> SyntheticDataGenerationResponse:
        """Run the pipeline and wait for it (blocking: the route runs in a worker
        thread, off the event loop)."""
        run = self.prepare(tenant=tenant, request=request)
        self._check_running(run.config)
        started = time.monotonic()
        pipeline = self._runner(run.prompts, run.config)
        outcomes = _collected(pipeline.batches(), expected=len(run.prompts))
        wall_s = time.monotonic() - started
        return SyntheticDataGenerationResponse(
            synthetic_data=[
                KScoredPromptGenerations(
                    prompt=request.prompts[outcome.index],
                    k_scored_generations=[
                        ScoredMessage(message=_assistant(c.text), score=c.score)
                        for c in outcome.candidates
                        if c.kept
                    ],
                )
                for outcome in outcomes
            ],
            statistics=statistics(outcomes, pipeline.stage_seconds, wall_s=wall_s),
        )

    # ------------------------------------------------------------------ as a job

    def submit_job(self, *, tenant: str, request: SyntheticDataJobRequest) -> JobSummary:
        """Store the job and hand it to Ray (idempotent by `job_uuid`, like fine-tuning);
        its summary as stored."""
        check_id(request.job_uuid, what="job_uuid")
        dataset_id = request.output.dataset_id or request.job_uuid
        check_id(dataset_id, what="output.dataset_id")
        self._jobs.submit(
            tenant=tenant,
            job_uuid=request.job_uuid,
            kind=JobKind.SYNTHETIC_DATA_GENERATION,
            body=request.model_dump(mode="json"),
            plan=lambda: self._plan(tenant, request, dataset_id),
        )
        return self._jobs.get(tenant=tenant, job_uuid=request.job_uuid, kinds=SDG_KINDS)

    def _plan(
        self, tenant: str, request: SyntheticDataJobRequest, dataset_id: str
    ) -> dict[str, Any]:
        """The launch config, validated by the recipe's config class (which the job
        validates the stored config with again); where the job reports is never in it."""
        run = self.prepare(tenant=tenant, request=request, as_job=True)
        self._check_running(run.config)
        launch = {
            "job_key": job_key(tenant, request.job_uuid),
            "pipeline": run.config.model_dump(mode="json"),
            "prompts": [prompt.model_dump(mode="json") for prompt in run.prompts],
            "output": {**request.output.model_dump(mode="json"), "dataset_id": dataset_id},
            **job_output(self._storage, tenant, request.job_uuid),
        }
        try:
            config = SyntheticDataJobConfig.model_validate(launch)
        except ValidationError as exc:
            raise InvalidRequest(f"the job cannot run as asked: {_problems(exc)}") from None
        checked: dict[str, Any] = config.model_dump(mode="json")
        return checked


def _settings(reward_scoring: dict[str, Any] | None) -> SyntheticDataSettings:
    if reward_scoring is None:
        return SyntheticDataSettings()
    try:
        return SyntheticDataSettings.model_validate(reward_scoring)
    except ValidationError as exc:
        raise InvalidRequest(
            f"invalid reward_scoring: {_problems(exc, 'reward_scoring')}"
        ) from None


def _prompt_input(index: int, prompt: Message) -> PromptInput:
    """The generating model gets the Llama 3 prompt of a one-message dialog (as chat
    completion renders it); the reward model, the message as its chat template takes it."""
    if prompt.role != "user":
        raise InvalidRequest(f"prompts.{index}: a prompt is a user message, not {prompt.role!r}")
    try:
        generation_prompt = format_chat([prompt])
        turns = tuple(
            PromptTurn.model_validate({"role": turn.role, "content": turn.content})
            for turn in chat_turns([prompt])
        )
    except InvalidRequest as exc:
        raise InvalidRequest(f"prompts.{index}: {exc.message}") from None
    return PromptInput(index=index, generation_prompt=generation_prompt, messages=turns)


def _collected(batches: Iterable[list[PromptOutcome]], *, expected: int) -> list[PromptOutcome]:
    """Every prompt's outcome in request order. A failed stage (StageFailed) becomes the
    domain error naming it; a pipeline that answers short is a failure too."""
    outcomes: list[PromptOutcome] = []
    try:
        for batch in batches:
            outcomes.extend(batch)
    except StageFailed as exc:
        if exc.unavailable:
            raise ModelUnavailable(
                f"the {exc.stage} stage's model is unavailable, try again shortly: {exc.detail}",
                retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
            ) from None
        raise PipelineFailed(exc.stage, exc.detail) from None
    outcomes.sort(key=lambda outcome: outcome.index)
    if [outcome.index for outcome in outcomes] != list(range(expected)):
        raise PipelineFailed(
            "collect", f"the pipeline answered for {len(outcomes)} of {expected} prompts"
        )
    return outcomes


def _assistant(text: str) -> Message:
    return Message(role="assistant", content=text, tool_calls=[], tool_responses=[])


def _problems(exc: ValidationError, prefix: str = "") -> str:
    """Pydantic's errors, one `field.path: message` each (the path under `prefix`)."""
    problems = []
    for err in exc.errors():
        parts = [prefix] if prefix else []
        location = ".".join([*parts, *(str(part) for part in err["loc"])])
        problems.append(f"{location or 'request'}: {err['msg']}")
    return "; ".join(problems)
