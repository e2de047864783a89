"""What a training job is asked to do: the launch configs of the recipes, in pydantic only.

The API validates a submission with these classes before it stores the job, and the job
process validates the stored launch config (`jobs.launch`) with them again, so this module
must stay light: it imports neither torch nor transformers nor peft (the API process never
loads them; `tests/test_light_api.py` checks). The recipes (`jobs/sft.py`, `jobs/dpo.py`)
import it and keep the heavy imports to themselves.

A launch config is stored as one flat JSON object (the `jobs.launch` column): the fields
every recipe shares live on `TrainingJobConfig`, each recipe's config adds its own beside
them, and renaming or nesting a field would stop stored configs from loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from corral.api.post_training import AlgorithmConfig, DPOAlignmentConfig, OptimizerConfig
from jobs.report_target import ReportTarget
from jobs.rows import preference_row_problem, sft_row_problem
from serve_apps.model_cache import ModelLocation, StorageOptions

ZeroStage = Literal[0, 1, 2, 3]
TrainingDtype = Literal["float32", "bfloat16"]

QLORA_UNDER_ZERO3 = (
    "qlora cannot run under ZeRO-3 (zero_stage 3, memory_efficient_fsdp_wrap): ZeRO-3 "
    "shards the 4-bit packed base weights as if they were plain tensors; use zero_stage "
    "0-2 or DDP, where the 4-bit base is small and stays whole on every worker"
)


class TrainingJobConfig(BaseModel):
    """The fields every training recipe takes: the job, its data, the schedule and how the
    work is spread over workers (jobs/distributed.py). The API side resolves datasets into
    rows; each recipe's config checks its rows against its own column rules."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_key: str
    # Where the job reports (set by jobs.launch; the API validates configs without it).
    # Never dumped, so never stored: it carries the job's token.
    report_to: ReportTarget | None = Field(default=None, exclude=True)
    # A local directory, or a storage URI (a checkpoint in object storage) that each node
    # downloads once before loading it (jobs.checkpointer.with_local_model).
    model_dir: ModelLocation
    # Where the job writes, on each node's disk: the job's directory itself when storage
    # is a directory every node sees; else scratch space whose checkpoints are then
    # uploaded under `output_uri`, the job's directory in object storage (corral.storage).
    output_dir: Path
    output_uri: str | None = None
    storage: StorageOptions = StorageOptions()
    rows: list[dict[str, Any]]
    validation_rows: list[dict[str, Any]]
    optimizer: OptimizerConfig
    n_epochs: int = Field(ge=1)
    n_iters: int = Field(ge=1, description="Most optimizer steps per epoch.")
    batch_size: int = Field(ge=1, description="Rows (DPO: preference pairs) per worker per step.")
    shuffle: bool = True
    seed: int = 0
    max_seq_len: int = Field(default=2048, ge=8)
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(default=2, ge=0, description="Worker group restarts.")
    zero_stage: ZeroStage | None = Field(
        default=None, description="None: DDP; 0-3: DeepSpeed with that ZeRO stage."
    )
    cpu_offload: bool = Field(default=False, description="DeepSpeed state in CPU memory.")
    activation_checkpointing: bool = False
    dtype: TrainingDtype = "float32"

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Without object storage a config dumps as configs stored before it did."""
        data: dict[str, Any] = handler(self)
        if self.output_uri is None:
            data.pop("output_uri", None)
            data.pop("storage", None)
        return data

    @model_validator(mode="after")
    def _shared_settings_fit_together(self) -> Self:
        if not self.rows:
            raise ValueError("no training rows")
        if self.cpu_offload and not self.zero_stage:
            raise ValueError(
                "cpu_offload needs DeepSpeed ZeRO (zero_stage 1-3): it offloads the state "
                "that ZeRO shards"
            )
        return self

    def describe_parallelism(self) -> str:
        """One line for the job's log: how the work is spread and in what precision."""
        parts = ["DDP" if self.zero_stage is None else f"DeepSpeed ZeRO-{self.zero_stage}"]
        if self.cpu_offload:
            parts.append("CPU offload")
        if self.activation_checkpointing:
            parts.append("activation checkpointing")
        parts.append(self.dtype)
        return ", ".join(parts)

    def check_rows(self, problem_of: Callable[[Mapping[str, Any]], str | None]) -> None:
        """Refuse the first training or validation row that `problem_of` finds fault with."""
        for name, rows in (("rows", self.rows), ("validation_rows", self.validation_rows)):
            for index, row in enumerate(rows):
                if (problem := problem_of(row)) is not None:
                    raise ValueError(f"{name}[{index}]: {problem}")


class SFTJobConfig(TrainingJobConfig):
    """Everything one supervised fine-tuning run needs (jobs/sft.py)."""

    algorithm: Literal["full", "lora", "qlora", "dora"]
    adapter: AlgorithmConfig | None = None  # required for lora, qlora and dora

    @model_validator(mode="after")
    def _settings_fit_together(self) -> Self:
        if self.algorithm != "full" and self.adapter is None:
            raise ValueError(f"algorithm {self.algorithm!r} needs adapter settings")
        self.check_rows(sft_row_problem)
        if self.algorithm == "qlora" and self.zero_stage == 3:
            raise ValueError(QLORA_UNDER_ZERO3)
        return self

    def attempt_lines(self, attempt: int, resume_from: str | None) -> list[str]:
        """The log lines that open an attempt of the job."""
        return [
            f"attempt {attempt}: {self.algorithm} on {self.num_workers} workers"
            + (f", resuming from {resume_from}" if resume_from else ""),
            f"parallelism: {self.describe_parallelism()}",
        ]


class DPOJobConfig(TrainingJobConfig):
    """Everything one direct preference optimization run needs (jobs/dpo.py). The policy
    starts from `model_dir`; the reference is a frozen copy of it."""

    dpo: DPOAlignmentConfig

    @model_validator(mode="after")
    def _settings_fit_together(self) -> Self:
        check_alignment(self.dpo)
        self.check_rows(preference_row_problem)
        return self

    def attempt_lines(self, attempt: int, resume_from: str | None) -> list[str]:
        """The log line that opens an attempt of the job."""
        dpo = self.dpo
        return [
            f"attempt {attempt}: dpo on {self.num_workers} workers "
            f"({self.describe_parallelism()}; beta {dpo.reward_scale}, epsilon {dpo.epsilon}, "
            f"gamma {dpo.gamma}, reward_clip {dpo.reward_clip})"
            + (f", resuming from {resume_from}" if resume_from else "")
        ]


def check_alignment(settings: DPOAlignmentConfig) -> None:
    """Refuse DPO settings the loss cannot use, saying which and why (ValueError)."""
    values = settings.model_dump()
    if not all(math.isfinite(value) for value in values.values()):
        raise ValueError(f"DPO settings must be finite numbers, got {values}")
    if settings.reward_scale <= 0:
        raise ValueError(f"reward_scale (DPO's beta) must be > 0, got {settings.reward_scale}")
    if not 0 <= settings.epsilon < 0.5:
        raise ValueError(
            "epsilon (label smoothing: the chance a preference is flipped) must be in "
            f"[0, 0.5), got {settings.epsilon}"
        )
    if settings.gamma < 0:
        raise ValueError(f"gamma (the target reward margin) must be >= 0, got {settings.gamma}")
    if settings.reward_clip < 0:
        raise ValueError(f"reward_clip must be >= 0 (0 turns it off), got {settings.reward_clip}")
