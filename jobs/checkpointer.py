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

Where the directories live is decided once, by `checkpoints_root`: today a directory under
the job's `output_dir`, which every worker must see.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
from ray.train import Checkpoint
from transformers import PreTrainedTokenizerBase

from jobs.attempts import last_checkpoint_path
from jobs.config import TrainingJobConfig
from jobs.distributed import TrainingEngine, barrier
from jobs.reporting import JobReporter

TRAINER_STATE = "trainer_state.pt"


def checkpoints_root(config: TrainingJobConfig) -> Path:
    """Where the job's checkpoint directories are written."""
    return config.output_dir / "checkpoints"


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
        report = {**metrics, "epoch": state.epochs_done, "step": state.step}
        if self._reporter is None:
            ray.train.report(report)
            return
        ray.train.report(
            report,
            checkpoint=Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=directory.name,
        )
        self._reporter.checkpoint(iters=state.step, path=str(directory), metrics=metrics)


def _load_trainer_state(directory: Path) -> TrainerState | None:
    path = directory / TRAINER_STATE
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    return TrainerState(epochs_done=int(saved["epochs_done"]), step=int(saved["step"]))
