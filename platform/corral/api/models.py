"""Corral's models API (not part of the Llama Stack spec): what is served, registering a
checkpoint or LoRA adapter, and scaling replicas on demand."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from corral.api.common import Id
from corral.serving.catalog import MAX_REPLICAS, MODEL_NAME_PATTERN


class RegisterModelRequest(BaseModel):
    """Serve a checkpoint directory (or a LoRA adapter over it) under a new name. The
    directories must be absolute and lie under the server's model roots."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    checkpoint_dir: str = Field(min_length=1, max_length=4096)
    adapter_dir: str | None = Field(default=None, min_length=1, max_length=4096)
    engine: Literal["transformers"] = "transformers"
    gpus_per_replica: float = Field(default=0.0, ge=0, le=64)
    min_replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    max_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    target_ongoing_requests: float = Field(default=2.0, gt=0, le=1024)
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    # The fine-tuning job that produced the weights, if any.
    source_job_uuid: Id | None = None

    @model_validator(mode="after")
    def _bounds(self) -> RegisterModelRequest:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


class ScaleModelRequest(BaseModel):
    """New replica bounds: `replicas` alone pins both; otherwise `min_replicas` and/or
    `max_replicas` (the other bound stays)."""

    model_config = ConfigDict(extra="forbid")

    model: Id
    min_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    max_replicas: int | None = Field(default=None, ge=1, le=MAX_REPLICAS)
    replicas: int | None = Field(default=None, ge=1, le=MAX_REPLICAS)


class ScaleModelResponse(BaseModel):
    name: str
    min_replicas: int
    max_replicas: int
    # RUNNING now; Serve adds or removes replicas towards the new bounds after this.
    replicas: int


class ModelInfo(BaseModel):
    name: str
    aliases: list[str]
    # "file": from the models file, shared by all tenants; "registered": a tenant's.
    source: Literal["file", "registered"]
    # The tenant a registered model belongs to (null for a file model).
    tenant: str | None = None
    checkpoint_dir: str
    adapter_dir: str | None
    engine: str
    gpus_per_replica: float
    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float
    max_batch_size: int
    source_job_uuid: str | None
    # The Serve app's status (RUNNING, DEPLOYING, DEPLOY_FAILED, ...) and RUNNING replicas.
    status: str
    replicas: int


class ModelList(BaseModel):
    data: list[ModelInfo]
