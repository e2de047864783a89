"""Corral's models API (not part of the Llama Stack spec): what is served, registering a
checkpoint or LoRA adapter, and scaling replicas on demand."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.api.common import Id
from serve_apps.options import (
    MAX_REPLICAS,
    MODEL_NAME_PATTERN,
    ModelKind,
    ReplicaOptions,
    ScoreWeights,
)


class RegisterModelRequest(ReplicaOptions):
    """Serve a checkpoint directory (or a LoRA adapter over it) under a new name, with any
    of the options a models file entry takes. The directories must be absolute and lie
    under the server's model roots."""

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    kind: ModelKind = "llm"
    checkpoint_dir: str = Field(min_length=1, max_length=4096)
    adapter_dir: str | None = Field(default=None, min_length=1, max_length=4096)
    # The fine-tuning job that produced the weights, if any.
    source_job_uuid: Id | None = None
    # kind reward only, for a head with several labels: the weight of each label's logit
    # in the one score (labels by name, as the checkpoint's config.json id2label has them).
    score_weights: ScoreWeights | None = None


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


class ModelInfo(ReplicaOptions):
    """A served model, with every one of its options."""

    name: str
    kind: ModelKind
    aliases: list[str]
    # "file": from the models file, shared by all tenants; "registered": a tenant's.
    source: Literal["file", "registered"]
    # The tenant a registered model belongs to (null for a file model).
    tenant: str | None = None
    checkpoint_dir: str
    adapter_dir: str | None
    source_job_uuid: str | None
    # A reward model's label weights (null for one with a single label, and for LLMs).
    score_weights: dict[str, float] | None = None
    # An adapter riding on a served base's replicas: that base's name (its options,
    # status and replicas are the base's; scale the base, not the adapter). Else null.
    base_model: str | None = None
    # The Serve app's status (RUNNING, DEPLOYING, DEPLOY_FAILED, ...) and RUNNING replicas.
    status: str
    replicas: int


class ModelList(BaseModel):
    data: list[ModelInfo]
