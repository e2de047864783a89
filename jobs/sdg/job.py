"""The synthetic data generation recipe: a job of kind `synthetic_data_generation`.

    main(config): started -> plan -> skip what an earlier attempt saved -> run the
    pipeline on the rest, one shard per finished batch -> dataset + statistics ->
    registered for the tenant, completed

Resume: every finished batch is saved whole as its own shard before it counts
(jobs/sdg/files.py), so an attempt after a crash runs only the prompts no shard holds;
seeds are derived from each prompt's index (jobs/sdg/config.py), so the dataset is the
one a single attempt would have written. Within an attempt, a run whose stage lost its
app (StageFailed.unavailable: a replica died, the app is being replaced) resumes the same
way, up to MAX_RESUMES times; any other stage failure fails the job at once.

Cancellation: JobsService.cancel records `cancelled` and stops the Ray job, which ends
this process. Should the process still be running (Ray unreachable at that moment), it
reads its row after every batch and stops there; and the dataset is registered in the
same transaction that completes the job, so a job that is no longer running never leaves
a dataset behind (the transition refuses the move and nothing is written).

A pipeline failure fails the job with the pipeline's error (it names the stage); so does
a run that returns fewer prompts than it was given, and one that leaves no rows (no
empty dataset is registered).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.store.jobs import JobStatus
from jobs.reporting import JobReporter
from jobs.sdg.config import PipelineConfig, PromptInput, SyntheticDataJobConfig
from jobs.sdg.dataset import Outcome, dataset_rows, encode_rows
from jobs.sdg.files import DATA_FILE, STATISTICS_FILE, JobFiles
from jobs.sdg.pipeline import StageFailed, run_pipeline, statistics

log = logging.getLogger(__name__)
# A stage whose app went away (a replica lost) is run again on the prompts no shard holds,
# this many times, after a pause that lets Serve replace the replica.
MAX_RESUMES = 2
RESUME_WAIT_S = 5.0


class PipelineRun(Protocol):
    """A started pipeline run (jobs/sdg/pipeline.py): finished batches as they come."""

    def batches(self) -> Iterator[Sequence[Outcome]]: ...
    @property
    def stage_seconds(self) -> Mapping[str, float]: ...


RunPipeline = Callable[[Sequence[PromptInput], PipelineConfig], PipelineRun]
Statistics = Callable[..., dict[str, Any]]  # (outcomes, stage_seconds, *, wall_s)


class JobStopped(Exception):
    """The job's row left `running` while it ran (cancelled): nothing more is written."""


def main(config: SyntheticDataJobConfig) -> None:
    """The recipe `jobs.launch` runs. Inside a Ray job the first Ray call (a Serve handle,
    a Ray Data dataset) joins the job's cluster: Ray sets RAY_ADDRESS for its jobs."""
    run(config, run_pipeline=run_pipeline, statistics=statistics)


def run(
    config: SyntheticDataJobConfig, *, run_pipeline: RunPipeline, statistics: Statistics
) -> None:
    """One attempt of the job, recorded in the store (started, then completed or failed)."""
    reporter = JobReporter.open(config.report_to, config.job_key)
    try:
        pipeline = config.pipeline
        started = reporter.started(
            resources_allocated={
                "generation_app": pipeline.generation_app,
                "reward_app": pipeline.reward_app,
                "batch_size": pipeline.batch_size,
                "max_in_flight": pipeline.max_in_flight,
            }
        )
        if not started.applied:
            log.warning("job %s is %s; not generating", config.job_key, started.status)
            return
        try:
            Generation(config, reporter, run_pipeline, statistics).run()
        except JobStopped as exc:
            reporter.log(str(exc))
        except Exception as exc:
            reporter.failed(str(exc) or type(exc).__name__)
            raise
    finally:
        reporter.close()


@dataclass
class Tally:
    """What the run has made so far (earlier attempts' shards included)."""

    resumed: int = 0  # of `prompts`, those an earlier attempt made
    prompts: int = 0
    generated: int = 0
    kept: int = 0

    def add(self, outcomes: Sequence[Outcome]) -> None:
        self.prompts += len(outcomes)
        for outcome in outcomes:
            self.generated += len(outcome.candidates)
            self.kept += sum(1 for c in outcome.candidates if c.kept)


@dataclass
class Generation:
    config: SyntheticDataJobConfig
    reporter: JobReporter
    run_pipeline: RunPipeline
    statistics: Statistics
    files: JobFiles = field(init=False)

    def __post_init__(self) -> None:
        self.files = JobFiles(self.config)

    def run(self) -> None:
        start = time.monotonic()
        prompts = self.config.prompts
        wanted = {prompt.index for prompt in prompts}
        done = {i: o for i, o in self.files.saved_outcomes().items() if i in wanted}
        self.reporter.plan(
            total_steps=len(prompts),
            detail=f"prompts; {len(done)} done by an earlier attempt, "
            f"{len(prompts) - len(done)} to generate in batches of "
            f"{self.config.pipeline.batch_size}",
        )
        outcomes: list[Outcome] = list(done.values())
        tally = Tally(resumed=len(outcomes))
        tally.add(outcomes)
        stage_seconds: dict[str, float] = {}
        for resumes in range(MAX_RESUMES + 1):
            finished = {outcome.index for outcome in outcomes}
            todo = [prompt for prompt in prompts if prompt.index not in finished]
            if not todo:
                break
            try:
                for stage, seconds in self._generate(todo, outcomes, tally, start).items():
                    stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
                break
            except StageFailed as exc:
                if not exc.unavailable or resumes == MAX_RESUMES:
                    raise
                self.reporter.log(
                    f"{exc}; the run resumes its unfinished prompts in {RESUME_WAIT_S:g} s "
                    f"({resumes + 1} of {MAX_RESUMES})"
                )
                time.sleep(RESUME_WAIT_S)
        missing = wanted - {outcome.index for outcome in outcomes}
        if missing:
            raise RuntimeError(
                f"the pipeline returned {len(wanted) - len(missing)} of {len(wanted)} prompts "
                f"(none for prompt {min(missing)})"
            )
        self._finish(outcomes, stage_seconds, wall_s=time.monotonic() - start)

    def _generate(
        self, todo: list[PromptInput], outcomes: list[Outcome], tally: Tally, start: float
    ) -> Mapping[str, float]:
        """Run the pipeline on `todo`, saving and reporting each batch as it finishes."""
        run = self.run_pipeline(todo, self.config.pipeline)
        for batch in run.batches():
            self._check_running()
            name = self.files.save_batch(batch)
            outcomes.extend(batch)
            tally.add(batch)
            scores = [c.score for outcome in batch for c in outcome.candidates]
            elapsed = max(time.monotonic() - start, 1e-9)
            self.reporter.metrics(
                step=tally.prompts,
                prompts_done=tally.prompts,
                candidates_generated=tally.generated,
                candidates_kept=tally.kept,
                batch_mean_score=sum(scores) / len(scores) if scores else float("nan"),
                batch_max_score=max(scores, default=float("nan")),
                prompts_per_second=(tally.prompts - tally.resumed) / elapsed,
            )
            self.reporter.log(
                f"batch {name}: {len(batch)} prompts; {tally.prompts}/"
                f"{len(self.config.prompts)} done, {tally.kept}/{tally.generated} kept"
            )
        return run.stage_seconds

    def _check_running(self) -> None:
        status = self.reporter.status()
        if status is not JobStatus.RUNNING:
            raise JobStopped(f"the job is {status}; generation stops here")

    def _finish(
        self, outcomes: list[Outcome], stage_seconds: Mapping[str, float], *, wall_s: float
    ) -> None:
        output = self.config.output
        made = dataset_rows(outcomes, self.config.prompts, output)
        reasons = ", ".join(f"{count} {why}" for why, count in made.dropped.items() if count)
        if not made.rows:
            raise RuntimeError(
                f"the run made no {output.format} rows from {len(outcomes)} prompts "
                f"(dropped: {reasons or 'none'}); no dataset is registered"
            )
        self._check_running()
        digest = self.files.write(DATA_FILE, encode_rows(made.rows))
        figures = self.statistics(outcomes, stage_seconds, wall_s=wall_s)
        figures = {**figures, "rows": len(made.rows), "dropped": made.dropped}
        self.files.write(STATISTICS_FILE, json.dumps(figures, indent=2).encode())
        self.reporter.log(
            f"dataset: {len(made.rows)} {output.format} rows from {len(outcomes)} prompts"
            + (f" (dropped: {reasons})" if reasons else "")
        )
        self._register_and_complete(len(made.rows), digest)

    def _register_and_complete(self, row_count: int, content_sha256: str) -> None:
        """Register the dataset for the job's tenant and complete the job, in one
        transaction on the server's side (corral.services.job_reports): both or neither.
        A dataset of that id with the same columns and content is left as it is; another
        one fails the job."""
        completed = self.reporter.completed_with_dataset(
            row_count=row_count, content_sha256=content_sha256
        )
        if not completed.applied:
            raise JobStopped(f"the job is {completed.status}; its dataset is not registered")
