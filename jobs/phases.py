"""Where a training job's start-up goes, phase by phase, as log lines for its users
(`phase: ...`): from the submission to the Ray Jobs API, the driver process starting and
importing, Ray Train starting the worker group, rank 0 tokenizing and loading the model,
the baseline validation, to the first step.

Light on purpose (the driver imports it): timestamps are wall-clock `time.time()` values
taken where each phase ends, so the driver's and the workers' can be set side by side
(one machine, or a cluster whose clocks agree to well under a second). The submission time
comes from the launcher (`corral.ray_jobs.SUBMITTED_AT_ENV`); a job run without it (a
recipe's `main()` called directly) logs the phases it can time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from corral.ray_jobs import SUBMITTED_AT_ENV

# The keys under which the driver hands its timestamps to the train loop, and the worker
# entry (jobs/launch.py) the (wall, CPU) seconds its recipe's imports took.
LOOP_CONFIG_KEY = "start_times"
IMPORTS_KEY = "recipe_imports_s"


def submitted_at() -> float | None:
    """When the launcher submitted this job to Ray, if it did."""
    try:
        return float(os.environ[SUBMITTED_AT_ENV])
    except (KeyError, ValueError):
        return None


def process_started_at() -> float:
    """When this process started (the driver: when Ray Jobs spawned its entrypoint)."""
    import psutil  # type: ignore[import-untyped]  # ray[default] brings it

    return float(psutil.Process().create_time())


def driver_line(*, submitted: float | None, process_started: float, now: float) -> str | None:
    """The driver's line, just before it starts the trainer (None outside a Ray job). The
    CPU time beside the wall time tells a slow start from a busy machine."""
    if submitted is None:
        return None
    return (
        f"phase: driver ready {now - submitted:.1f} s after submission "
        f"(Ray Jobs started it in {process_started - submitted:.1f} s, "
        f"imports and setup {now - process_started:.1f} s, {time.process_time():.1f} s of CPU)"
    )


@dataclass(frozen=True)
class StartTimes:
    """What the driver knew when it started the trainer."""

    submitted_at: float | None
    fit_started_at: float

    def as_loop_config(self) -> dict[str, Any]:
        return {LOOP_CONFIG_KEY: {"submitted_at": self.submitted_at, "fit": self.fit_started_at}}

    @classmethod
    def from_loop_config(cls, loop_config: dict[str, Any]) -> StartTimes | None:
        times = loop_config.get(LOOP_CONFIG_KEY)
        if not isinstance(times, dict):
            return None
        return cls(submitted_at=times.get("submitted_at"), fit_started_at=float(times["fit"]))


class StartClock:
    """Rank 0's stopwatch from entering the train loop to logging its first step: each
    method returns the phase line for what just ended."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        self._times = StartTimes.from_loop_config(loop_config)
        # (wall, CPU) seconds, from the worker entry that imported the recipe
        self._imports: tuple[float, float] | None = loop_config.get(IMPORTS_KEY)
        self._last = time.time()

    def _lap(self) -> float:
        now = time.time()
        elapsed, self._last = now - self._last, now
        return elapsed

    def worker_group_ready(self) -> str:
        """Ray Train's part: controller, worker processes, process group (and, when the
        recipe is imported in the worker, its imports)."""
        if self._times is None:
            return "phase: train loop running"
        imports = ""
        if self._imports:
            wall, cpu = self._imports
            imports = f", recipe imports {wall:.1f} s ({cpu:.1f} s of CPU)"
        started = self._last - self._times.fit_started_at
        return f"phase: worker group ready {started:.1f} s after the trainer started{imports}"

    def data_ready(self, rows: int) -> str:
        return f"phase: tokenizer loaded and {rows} rows tokenized in {self._lap():.2f} s"

    def model_ready(self) -> str:
        return f"phase: model loaded and prepared for training in {self._lap():.2f} s"

    def baseline_done(self) -> str:
        return f"phase: baseline validated in {self._lap():.2f} s"

    def first_step(self) -> str:
        took = self._lap()
        times = self._times
        if times is None:
            return f"phase: first step took {took:.2f} s"
        since = (
            f"{self._last - times.submitted_at:.1f} s after submission"
            if times.submitted_at is not None
            else f"{self._last - times.fit_started_at:.1f} s after the trainer started"
        )
        return f"phase: first step took {took:.2f} s; logged {since}"
