"""A training job's checkpoints, for every recipe: the one place that writes a checkpoint
directory and opens one to resume from (after torchtune's checkpointers).

A checkpoint is a directory `iter-{step}` under the job's checkpoints root, holding
- the model in Hugging Face format (a peft adapter for peft models, full weights
  otherwise) and the tokenizer, so it loads and serves as it is;
- the optimizer and schedule (`optimizer.pt`, or DeepSpeed's shards under `deepspeed/`:
  whatever the training engine of jobs/distributed.py saves);
- the progress, `trainer_state.pt`.
Each is reported to Ray Train, so a restarted worker group resumes from it, and recorded as
one of the job's checkpoint rows; every rank of a new attempt resumes from the last row
(jobs/attempts.py says why the row and not Ray Train's own checkpoint).

Where the directories live is decided once, by `checkpoints_root`: a directory under the
job's `output_dir`. On storage every node sees (the default) that is the job's directory
itself and the rows hold its paths. With object storage (`output_uri`, see
corral.storage) `output_dir` is each node's own scratch space: once every rank has
written its part, the first rank of each node uploads that node's directory to
`output_uri/checkpoints/iter-N` (so ZeRO shards written on other nodes arrive too), and
the row holds that URI; resuming downloads it once per node into the node's model cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import ray.train
import torch
from ray.train import Checkpoint
from transformers import PreTrainedTokenizerBase

from corral.storage import Storage
from jobs.attempts import last_checkpoint_path
from jobs.config import TrainingJobConfig
from jobs.distributed import TrainingEngine, barrier
from jobs.logger_config import TENSORBOARD_DIR
from jobs.reporting import JobReporter
from serve_apps.model_cache import is_local, local_model_dir

TRAINER_STATE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
Config = TypeVar("Config", bound=TrainingJobConfig)


def checkpoints_root(config: TrainingJobConfig) -> Path:
    """Where the job's checkpoint directories are written."""
    return config.output_dir / CHECKPOINTS


def with_local_model(config: Config) -> Config:
    """`config` with its `model_dir` on this node's disk: a model in object storage (e.g.
    DPO from a checkpoint in S3) is downloaded once per node first."""
    if not isinstance(config.model_dir, str):
        return config
    local = local_model_dir(config.model_dir, options=config.storage)
    return config.model_copy(update={"model_dir": local})


@dataclass(frozen=True)
class TrainerState:
    """How far a run got: where a run that resumes from its checkpoint carries on."""

    epochs_done: int = 0
    step: int = 0


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run resumes from, a local directory while `Checkpointer.resume`
    holds it open."""

    source: str  # the checkpoint row's path
    directory: Path
    state: TrainerState | None  # None: no progress saved, so only the weights carry over


class Checkpointer:
    """Saves a job's checkpoints and opens its last one to resume from. Every rank makes
    one and calls every method (ZeRO gathers weights and writes optimizer shards from all
    ranks, and Ray Train waits for every rank's report); `reporter` is rank 0's only, and
    rank 0 alone writes the files every rank shares and records the checkpoint rows."""

    def __init__(self, config: TrainingJobConfig, *, reporter: JobReporter | None) -> None:
        self._config = config
        self._root = checkpoints_root(config)
        self._reporter = reporter

    @contextmanager
    def resume(self) -> Iterator[Resume | None]:
        """The job's last checkpoint (None before the first), open while the recipe builds
        its model from `directory` and `restore`s its training state."""
        source = last_checkpoint_path(self._config)
        if source is None:
            yield None
            return
        if not is_local(source):  # in object storage: one download per node
            directory = local_model_dir(source, options=self._config.storage)
            yield Resume(source=source, directory=directory, state=_load_trainer_state(directory))
            return
        with Checkpoint.from_directory(source).as_directory() as local:
            directory = Path(local)
            yield Resume(source=source, directory=directory, state=_load_trainer_state(directory))

    def restore(self, engine: TrainingEngine, resume: Resume | None) -> TrainerState:
        """The optimizer and schedule of `resume` into `engine`, and where training carries
        on: from the start when there is nothing to resume."""
        if resume is None or resume.state is None:
            return TrainerState()
        engine.load_state(resume.directory)
        return resume.state

    def save(
        self,
        engine: TrainingEngine,
        tokenizer: PreTrainedTokenizerBase,
        state: TrainerState,
        *,
        metrics: dict[str, float],
    ) -> None:
        """Write the checkpoint of `state.step`, report it to Ray Train once every rank
        has written its part, and record it in the store."""
        directory = self._root / f"iter-{state.step}"
        directory.mkdir(parents=True, exist_ok=True)
        engine.save_hf(directory)
        engine.save_state(directory)
        if self._reporter is not None:
            tokenizer.save_pretrained(str(directory))
            progress = {"epochs_done": state.epochs_done, "step": state.step}
            torch.save(progress, directory / TRAINER_STATE)
        barrier()  # rank 0 reports only a complete directory
        location = str(directory)
        storage = (
            Storage(self._config.output_uri, options=self._config.storage)
            if self._config.output_uri is not None
            else None
        )
        if storage is not None:
            location = f"{self._config.output_uri}/{CHECKPOINTS}/{directory.name}"
            if ray.train.get_context().get_local_rank() == 0:
                storage.upload_dir(directory, location)
            barrier()  # every node's part is stored before the row says it is there
        report = {**metrics, "epoch": state.epochs_done, "step": state.step}
        if self._reporter is None:
            ray.train.report(report)
            return
        ray.train.report(
            report,
            checkpoint=Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=directory.name,
        )
        self._reporter.checkpoint(iters=state.step, path=location, metrics=metrics)
        events = self._config.output_dir / TENSORBOARD_DIR
        if storage is not None and events.is_dir():
            # Rank 0's TensorBoard files (jobs/reporting.py), as far as they go now.
            storage.upload_dir(events, f"{self._config.output_uri}/{TENSORBOARD_DIR}")


def _load_trainer_state(directory: Path) -> TrainerState | None:
    path = directory / TRAINER_STATE
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    return TrainerState(epochs_done=int(saved["epochs_done"]), step=int(saved["step"]))
