"""Post-training: supervised fine-tuning (full, LoRA, QLoRA, DoRA) and preference
optimization (DPO) jobs, and what a job reports back (status, logs, checkpoints).

The lower bounds on counts, ranks and rates are Corral's (the spec gives none): a value
outside them could only fail later, inside a running job."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import AwareDatetime, Field, model_validator

from corral.api.common import URL, Id, JsonObject, PretrainedModel, SpecModel
from corral.api.datasets import Dataset

OptimizerType = Literal["adam", "adamw", "sgd"]
FinetuningAlgorithm = Literal["full", "lora", "qlora", "dora"]
RLHFAlgorithm = Literal["dpo"]
PostTrainingJobStatus = Literal["running", "completed", "failed", "scheduled"]


class OptimizerConfig(SpecModel):
    optimizer_type: OptimizerType
    lr: float = Field(gt=0.0, description="Learning rate; greater than 0.")
    lr_min: float = Field(ge=0.0, description="Floor of the schedule; 0 <= lr_min <= lr.")
    weight_decay: float = Field(ge=0.0, description="At least 0.")

    @model_validator(mode="after")
    def _floor_below_rate(self) -> Self:
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min}) must not exceed lr ({self.lr})")
        return self


class TrainingConfig(SpecModel):
    n_epochs: int = Field(ge=1, description="At least 1.")
    batch_size: int = Field(ge=1, description="Per-device batch size; at least 1.")
    shuffle: bool
    n_iters: int = Field(ge=1, description="At least 1.")
    enable_activation_checkpointing: bool
    memory_efficient_fsdp_wrap: bool
    fsdp_cpu_offload: bool


class _LowRankAdapterConfig(SpecModel):
    """The shape the spec gives LoRA, QLoRA and DoRA alike."""

    lora_attn_modules: list[str]
    apply_lora_to_mlp: bool
    apply_lora_to_output: bool
    rank: int = Field(ge=1, description="Adapter rank; at least 1.")
    alpha: int = Field(ge=1, description="Adapter scaling numerator; at least 1.")


class LoraFinetuningConfig(_LowRankAdapterConfig):
    pass


class QLoraFinetuningConfig(_LowRankAdapterConfig):
    pass


class DoraFinetuningConfig(_LowRankAdapterConfig):
    pass


AlgorithmConfig = LoraFinetuningConfig | QLoraFinetuningConfig | DoraFinetuningConfig
# The three configs are indistinguishable on the wire, so `algorithm` names the class.
_CONFIG_FOR_ALGORITHM: dict[
    str, type[LoraFinetuningConfig] | type[QLoraFinetuningConfig] | type[DoraFinetuningConfig]
] = {
    "lora": LoraFinetuningConfig,
    "qlora": QLoraFinetuningConfig,
    "dora": DoraFinetuningConfig,
}


class DPOAlignmentConfig(SpecModel):
    reward_scale: float
    reward_clip: float
    epsilon: float
    gamma: float


class PostTrainingSFTRequest(SpecModel):
    """Request to finetune a model."""

    job_uuid: Id
    model: PretrainedModel
    dataset: Dataset
    validation_dataset: Dataset
    algorithm: FinetuningAlgorithm
    algorithm_config: AlgorithmConfig = Field(
        description="Parsed as the config class that `algorithm` names (LoRA for 'full')."
    )
    optimizer_config: OptimizerConfig
    training_config: TrainingConfig
    hyperparam_search_config: JsonObject
    logger_config: JsonObject

    @model_validator(mode="after")
    def _config_class_follows_algorithm(self) -> Self:
        wanted = _CONFIG_FOR_ALGORITHM.get(self.algorithm)
        if wanted is not None and type(self.algorithm_config) is not wanted:
            # Plain attribute assignment: the model does not validate on assignment.
            self.algorithm_config = wanted.model_validate(self.algorithm_config.model_dump())
        return self


class PostTrainingRLHFRequest(SpecModel):
    """Request to finetune a model."""

    job_uuid: Id
    finetuned_model: URL
    dataset: Dataset
    validation_dataset: Dataset
    algorithm: RLHFAlgorithm
    algorithm_config: DPOAlignmentConfig
    optimizer_config: OptimizerConfig
    training_config: TrainingConfig
    hyperparam_search_config: JsonObject
    logger_config: JsonObject


class CheckpointRef(SpecModel):
    """One saved checkpoint of a job: the iteration it was taken at and where it is."""

    iters: int
    path: URL


class PostTrainingJobStatusResponse(SpecModel):
    """Status of a finetuning job."""

    job_uuid: str
    status: PostTrainingJobStatus
    scheduled_at: AwareDatetime | None = None
    started_at: AwareDatetime | None = None
    completed_at: AwareDatetime | None = None
    resources_allocated: JsonObject | None = None
    checkpoints: list[CheckpointRef]


class PostTrainingJobLogStream(SpecModel):
    """Stream of logs from a finetuning job."""

    job_uuid: str
    log_lines: list[str]


class PostTrainingJobArtifactsResponse(SpecModel):
    """Artifacts of a finetuning job."""

    job_uuid: str
    checkpoints: list[CheckpointRef]
