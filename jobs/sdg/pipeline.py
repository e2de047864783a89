"""The synthetic data pipeline on Ray Data: prompts in, scored and filtered candidates
out, batch by batch as each finishes.

    from_items(prompts) -> map_batches(Generate) -> map_batches(Score) -> map_batches(Filter)

Each stage is a callable class in its own one-actor pool. Generate and Score wait on Serve
(the LLM app's `generate`, the reward app's `score`), so they hold fractional CPUs, and
each sends its batch's calls concurrently through one thread pool of `max_in_flight`
threads: that actor is the stage's only caller, so no more than `max_in_flight` requests
are ever in flight to each app, however many batches overlap. An actor runs two batches
at once, so an app is not left idle while a batch's last answers arrive. Ray Data's
streaming executor runs the stages together: batch 2 generates while batch 1 is scored.

Candidate j of prompt i is sampled with `candidate_seed(generation.seed, i, j)`, and the
random filters draw from a per-prompt RNG (`jobs/sdg/filters.py`), so a run's output does
not depend on how it was batched. Rows travel between stages as JSON strings (a prompt,
its candidates, their scores): small, and plain Arrow columns.

A batch that fails fails the run: `PipelineRun.batches()` raises `StageFailed`, naming the
stage and the cause, and yields nothing short."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import statistics as stats
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from jobs.resources import SDG_STAGE_CPUS
from jobs.sdg.config import PipelineConfig, PromptInput
from jobs.sdg.filters import filter_seed, keep
from serve_apps.engines.protocol import (
    ChatMessage,
    EngineRequestError,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    ScoringRequest,
)

Stage = Literal["generate", "score", "filter"]
STAGES: tuple[Stage, ...] = ("generate", "score", "filter")
# CPUs each stage's actor reserves (what admission counts: jobs/resources.py).
STAGE_CPUS = SDG_STAGE_CPUS
# Batches one stage's actor works on at once (its calls share the in-flight bound).
BATCHES_PER_ACTOR = 2
QUANTILES = (10, 25, 50, 75, 90)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredCandidate:
    text: str
    score: float
    kept: bool
    stop_reason: str


@dataclass(frozen=True)
class PromptOutcome:
    """One prompt's candidates, in generation order."""

    index: int
    candidates: tuple[ScoredCandidate, ...]


class StageFailed(Exception):
    """A batch failed in `stage`, so the run did. `unavailable`: the stage's app is not
    deployed or its replicas are gone (the service answers 503); otherwise the model
    refused a request (EngineRequestError) or failed."""

    def __init__(self, stage: Stage, message: str, *, unavailable: bool = False) -> None:
        super().__init__(f"synthetic data generation failed in stage {stage!r}: {message}")
        self.stage = stage
        self.unavailable = unavailable
        self.detail = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses from the stage's actor to the driver by pickle.
        return (_stage_failed, (self.stage, self.detail, self.unavailable))


def _stage_failed(stage: Stage, message: str, unavailable: bool) -> StageFailed:
    return StageFailed(stage, message, unavailable=unavailable)


def candidate_seed(seed: int, prompt_index: int, candidate: int) -> int:
    """The sampling seed of one candidate: a stable 31-bit function of its three parts."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


# --- calling the apps -------------------------------------------------------------------


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import (
        ActorUnschedulableError,
        LocalRayletDiedError,
        NodeDiedError,
        OutOfMemoryError,
        RayActorError,
        WorkerCrashedError,
    )
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        RayServeException,
        ReplicaUnavailableError,
    )

    return (
        RayActorError,  # ActorDiedError, ActorUnavailableError
        WorkerCrashedError,
        NodeDiedError,
        LocalRayletDiedError,
        OutOfMemoryError,
        ActorUnschedulableError,
        DeploymentUnavailableError,  # the app failed to deploy
        ReplicaUnavailableError,
        BackPressureError,  # the app's queue is full: it cannot take the run now
        RayServeException,  # no such app (deleted, never deployed)
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def stage_error(stage: Stage, app: str, error: BaseException) -> StageFailed:
    """What a call to `app` failed with, as the run's failure."""
    from ray.exceptions import RayTaskError

    cause: BaseException = error.cause if isinstance(error, RayTaskError) else error
    gone: tuple[type[BaseException], ...] = (*_unavailable_errors(), MemoryError)
    if isinstance(cause, EngineRequestError):
        return StageFailed(stage, f"app {app!r} refused a request: {cause}")
    if isinstance(cause, gone):
        return StageFailed(
            stage, f"app {app!r} is unavailable ({_first_line(cause)})", unavailable=True
        )
    return StageFailed(stage, f"app {app!r} failed ({_first_line(cause)})")


class _AppCaller:
    """One stage's calls to one Serve app, at most `max_in_flight` at a time."""

    def __init__(self, stage: Stage, app: str, method: str, max_in_flight: int) -> None:
        from ray import serve

        self._stage: Stage = stage
        self._app = app
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix=f"sdg-{stage}")
        # Taking the method's handle now starts its router finding the app's replicas
        # (seconds) while the actor waits for its first batch. A failure waits for that
        # batch too: a constructor that raises makes Ray Data restart the actor.
        self._method: Any = None
        self._error: Exception | None = None
        try:
            self._method = getattr(serve.get_app_handle(app), method)
        except Exception as exc:
            self._error = exc

    def _call(self, request: Any) -> Any:
        # Each thread blocks on its own response: the pool's size is the in-flight bound.
        return self._method.remote(request).result()

    def call_all(self, requests: Sequence[Any]) -> list[Any]:
        """Every request's answer, in order; StageFailed at the first failure."""
        try:
            if self._error is not None:
                raise self._error
            return list(self._pool.map(self._call, requests))
        except Exception as exc:
            raise stage_error(self._stage, self._app, exc) from None


def _strings(values: Iterable[Any]) -> np.ndarray:
    return np.array([json.dumps(v) for v in values], dtype=object)


class _StageUDF:
    """One stage's callable: runs `process` on a batch, timed. A batch that failed here or
    upstream travels on as data (its `failure` column): an exception a UDF raises reaches
    the driver as Ray Data's UserCodeException, with the StageFailed under it lost in
    pickling, so the driver would only have a traceback's text to name the stage by."""

    stage: Stage
    # The columns this stage adds, and what a failed batch carries in them.
    adds: ClassVar[dict[str, Any]]

    def process(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = len(batch["index"])
        if "failure" not in batch:
            batch["failure"] = np.full(rows, "", dtype=object)
        if any(batch["failure"]):
            return _placeholders(batch, self.adds)
        start = time.perf_counter()
        try:
            batch = self.process(batch)
        except StageFailed as failed:
            batch["failure"] = np.full(rows, json.dumps(_failure(failed)), dtype=object)
            return _placeholders(batch, self.adds)
        # A share per row: a block may join batches, and the driver's sum over rows is
        # still the sum over batches.
        batch[f"{self.stage}_s"] = np.full(rows, (time.perf_counter() - start) / rows)
        return batch


def _placeholders(batch: dict[str, Any], adds: Mapping[str, Any]) -> dict[str, Any]:
    rows = len(batch["index"])
    for column, value in adds.items():
        batch[column] = np.full(rows, value, dtype=object if isinstance(value, str) else float)
    return batch


def _failure(failed: StageFailed) -> dict[str, Any]:
    return {"stage": failed.stage, "detail": failed.detail, "unavailable": failed.unavailable}


class Generate(_StageUDF):
    """k candidates per prompt from the generation app."""

    stage = "generate"
    adds: ClassVar[dict[str, Any]] = {"texts": "[]", "stop_reasons": "[]", "generate_s": 0.0}

    def __init__(self, config_json: str) -> None:
        self._config = PipelineConfig.model_validate_json(config_json)
        self._app = _AppCaller(
            "generate", self._config.generation_app, "generate", self._config.max_in_flight
        )

    def process(self, batch: dict[str, Any]) -> dict[str, Any]:
        prompts = [PromptInput.model_validate_json(p) for p in batch["prompt"]]
        settings = self._config.settings.generation
        k = settings.num_candidates
        requests = [
            GenerationRequest(
                prompt=p.generation_prompt,
                sampling=SamplingOptions(
                    max_tokens=settings.max_tokens,
                    strategy=settings.strategy,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    top_k=settings.top_k,
                    seed=candidate_seed(settings.seed, p.index, j),
                ),
            )
            for p in prompts
            for j in range(k)
        ]
        results: list[GenerationResult] = self._app.call_all(requests)
        per_prompt = [results[i * k : (i + 1) * k] for i in range(len(prompts))]
        batch["texts"] = _strings([r.text for r in rs] for rs in per_prompt)
        batch["stop_reasons"] = _strings([str(r.stop_reason) for r in rs] for rs in per_prompt)
        return batch


class Score(_StageUDF):
    """Each candidate's reward: the prompt's turns, then the candidate as the assistant's."""

    stage = "score"
    adds: ClassVar[dict[str, Any]] = {"scores": "[]", "score_s": 0.0}

    def __init__(self, config_json: str) -> None:
        config = PipelineConfig.model_validate_json(config_json)
        self._app = _AppCaller("score", config.reward_app, "score", config.max_in_flight)

    def process(self, batch: dict[str, Any]) -> dict[str, Any]:
        prompts = [PromptInput.model_validate_json(p) for p in batch["prompt"]]
        texts = [json.loads(t) for t in batch["texts"]]
        requests = [
            ScoringRequest(
                messages=(
                    *(ChatMessage(role=m.role, content=m.content) for m in prompt.messages),
                    ChatMessage(role="assistant", content=text),
                )
            )
            for prompt, candidates in zip(prompts, texts, strict=True)
            for text in candidates
        ]
        scores = iter(float(s) for s in self._app.call_all(requests))
        batch["scores"] = _strings([next(scores) for _ in candidates] for candidates in texts)
        return batch


class Filter(_StageUDF):
    """The filtering function, per prompt."""

    stage = "filter"
    adds: ClassVar[dict[str, Any]] = {"kept": "[]", "filter_s": 0.0}

    def __init__(self, config_json: str) -> None:
        self._config = PipelineConfig.model_validate_json(config_json)

    def process(self, batch: dict[str, Any]) -> dict[str, Any]:
        config = self._config
        try:
            kept = [
                keep(
                    config.filtering_function,
                    json.loads(scores),
                    config.settings.filter,
                    seed=filter_seed(config.settings),
                    prompt_index=int(index),
                )
                for index, scores in zip(batch["index"], batch["scores"], strict=True)
            ]
        except Exception as exc:
            raise StageFailed("filter", _first_line(exc)) from None
        batch["kept"] = _strings(kept)
        return batch


# --- the run ------------------------------------------------------------------------------


def _outcomes(batch: Mapping[str, Any]) -> list[PromptOutcome]:
    rows = zip(
        batch["index"],
        batch["texts"],
        batch["scores"],
        batch["kept"],
        batch["stop_reasons"],
        strict=True,
    )
    return [
        PromptOutcome(
            index=int(index),
            candidates=tuple(
                ScoredCandidate(text=t, score=s, kept=k, stop_reason=r)
                for t, s, k, r in zip(
                    json.loads(texts),
                    json.loads(scores),
                    json.loads(kept),
                    json.loads(reasons),
                    strict=True,
                )
            ),
        )
        for index, texts, scores, kept, reasons in rows
    ]


def _raise_failure(batch: Mapping[str, Any]) -> None:
    """Raise the StageFailed a batch carries, if it carries one."""
    for failure in batch["failure"]:
        if failure:
            found = json.loads(failure)
            raise StageFailed(found["stage"], found["detail"], unavailable=found["unavailable"])


_OPERATOR = re.compile(r"MapBatches\((Generate|Score|Filter)\)")


def unexpected_failure(error: BaseException) -> StageFailed | None:
    """A UDF's own bug (anything but StageFailed), named by the operator it failed in."""
    found = _OPERATOR.search(str(error))
    if found is None:
        return None
    stage: Stage = {"Generate": "generate", "Score": "score", "Filter": "filter"}[found[1]]  # type: ignore[assignment]
    return StageFailed(stage, f"the pipeline's {stage} stage failed ({type(error).__name__})")


def _quiet_data_context() -> None:
    """No progress bars or per-run stats in the API's or the job's logs."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False


@dataclass
class PipelineRun:
    """A started run: iterate `batches()` once; `stage_seconds` is complete after it."""

    prompts: Sequence[PromptInput]
    config: PipelineConfig
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def _dataset(self) -> Any:
        import ray.data
        from ray.data import ActorPoolStrategy

        _quiet_data_context()
        rows = [{"index": p.index, "prompt": p.model_dump_json()} for p in self.prompts]
        blocks = max(1, math.ceil(len(rows) / self.config.batch_size))
        dataset: Any = ray.data.from_items(rows, override_num_blocks=blocks)
        config_json = self.config.model_dump_json()
        for stage in (Generate, Score, Filter):
            dataset = dataset.map_batches(
                stage,
                fn_constructor_kwargs={"config_json": config_json},
                batch_size=self.config.batch_size,
                batch_format="numpy",
                compute=ActorPoolStrategy(
                    size=1,
                    max_concurrent_calls_per_actor=BATCHES_PER_ACTOR,
                    enable_true_multi_threading=True,
                ),
                num_cpus=STAGE_CPUS,
            )
        return dataset

    def batches(self) -> Iterator[list[PromptOutcome]]:
        """Each finished batch's outcomes, in no particular order; StageFailed if any
        batch fails (after which nothing more is yielded)."""
        if not self.prompts:
            return
        _check_apps(self.config)
        stream = iter(self._dataset().iter_batches(batch_size=None, batch_format="numpy"))
        try:
            for batch in stream:
                _raise_failure(batch)
                for stage in STAGES:
                    self.stage_seconds[stage] += float(batch[f"{stage}_s"].sum())
                yield _outcomes(batch)
        except StageFailed:
            raise
        except Exception as exc:
            failed = unexpected_failure(exc)
            if failed is None:
                raise
            log.error("%s:\n%s", failed, exc)
            raise failed from None
        finally:
            # Stops the executor and its actors now, on failure or when the caller stops
            # early, not whenever the iterator is collected.
            close = getattr(stream, "close", None)
            if close is not None:
                close()


def _check_apps(config: PipelineConfig) -> None:
    """Fail fast, before any actor starts, when an app is not deployed."""
    from ray import serve

    for stage, app in (("generate", config.generation_app), ("score", config.reward_app)):
        try:
            serve.get_app_handle(app)
        except Exception as exc:
            raise stage_error(stage, app, exc) from None  # type: ignore[arg-type]


def run_pipeline(prompts: Sequence[PromptInput], config: PipelineConfig) -> PipelineRun:
    """A run over `prompts` (Ray connected, Serve running); nothing runs until
    `batches()` is iterated."""
    return PipelineRun(prompts=prompts, config=config)


# --- statistics ---------------------------------------------------------------------------


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile, linearly interpolated between the closest ranks (numpy's
    default, 'linear')."""
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def score_summary(scores: Iterable[float]) -> dict[str, float] | None:
    """min / mean / max and the QUANTILES of `scores`; None when there are none."""
    values = sorted(scores)
    if not values:
        return None
    summary = {"min": values[0], "mean": stats.fmean(values), "max": values[-1]}
    return summary | {f"p{q}": quantile(values, q) for q in QUANTILES}


def statistics(
    outcomes: Iterable[PromptOutcome], stage_seconds: Mapping[str, float], *, wall_s: float
) -> dict[str, Any]:
    """The response's `statistics`: counts, score figures over every candidate and over
    the kept ones, and seconds per stage (each stage's busy time summed over batches, so
    with stages overlapping they may add up to more than `total`, the run's wall time)."""
    outcomes = list(outcomes)
    candidates = [c for outcome in outcomes for c in outcome.candidates]
    kept = [c for c in candidates if c.kept]
    return {
        "prompts": len(outcomes),
        "generated": len(candidates),
        "kept": len(kept),
        "filtered": len(candidates) - len(kept),
        "scores": score_summary(c.score for c in candidates),
        "kept_scores": score_summary(c.score for c in kept),
        "seconds": {stage: float(stage_seconds.get(stage, 0.0)) for stage in STAGES}
        | {"total": wall_s},
    }
