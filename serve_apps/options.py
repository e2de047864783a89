"""How one model's replicas are sized and scaled, declared once for every model kind.

`ReplicaOptions` travels to the replicas inside each app's config (`serve_apps.llm`
extends it), and the control plane's models file, registration request, stored row and
listing all carry these same fields with these same bounds. It is pydantic only: the API
process imports it without any engine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# What a served model does; each kind has its own Serve app (only "llm" so far).
ModelKind = Literal["llm", "reward", "embedding", "classifier"]
# What runs the weights inside a replica; each app kind says which engines it has.
EngineName = Literal["transformers", "vllm"]
# The names models are served under (app names are built from them, so never an `@`).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
# A reward head's label names (config.json `id2label`) and the weight of each label's
# logit in the model's one score.
ScoreWeights = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=200)], float],
    Field(min_length=1, max_length=1024),
]
# The LoRA ranks vLLM can reserve room for (its `max_lora_rank` takes only these).
AdapterRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
# Far beyond any cluster Corral runs on; it keeps a typo from asking Serve for 10^6 actors.
MAX_REPLICAS = 256


class ReplicaOptions(BaseModel):
    """One model's engine, resources, batching and autoscaling, per replica."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    engine: EngineName = "transformers"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gpus_per_replica: float = Field(default=0.0, ge=0, le=64)
    cpus_per_replica: float = Field(default=0.5, gt=0, le=1024)
    min_replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS)
    max_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    initial_replicas: int | None = Field(default=None, ge=0, le=MAX_REPLICAS)
    target_ongoing_requests: float = Field(default=2.0, gt=0, le=1024)
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    # How long a reward, embedding or classifier replica waits to fill a batch; an LLM
    # replica never waits (serve_apps.scheduler: requests join its running batch).
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, le=60)
    # How many requests wait in a replica's own queue behind its running batch, and, once
    # every replica's is full, in each caller's router; past those, callers get
    # BackPressureError at once (serve_apps.deployment.max_ongoing_requests).
    max_queued_requests: int = Field(default=64, ge=1, le=1_000_000)
    upscale_delay_s: float = Field(default=3.0, ge=0, le=86_400)
    downscale_delay_s: float = Field(default=30.0, ge=0, le=86_400)
    # How far back the autoscaler averages ongoing requests. Ray 2.60 pushes replica
    # metrics every 10 s and wants a longer window than that.
    look_back_period_s: float = Field(default=30.0, gt=10.0, le=86_400)
    # engine vllm: how many LoRA adapters each replica keeps loaded for the adapters
    # registered over this model (the least recently used idle one makes room for a new
    # one). 0: none rides on it; an adapter registered over it gets an app of its own.
    max_adapters: int = Field(default=0, ge=0, le=256)
    # The most of those slots one tenant's adapters take, so that no tenant can push out
    # every other tenant's adapters; None: half of them, rounded up.
    max_adapters_per_tenant: int | None = Field(default=None, ge=1, le=256)
    # The largest LoRA rank an adapter over this model may have (vLLM reserves room for
    # it in every slot); a registration of a higher-rank adapter is refused.
    max_adapter_rank: AdapterRank = 16

    @model_validator(mode="after")
    def _bounds(self) -> ReplicaOptions:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.max_adapters > 0 and self.engine != "vllm":
            raise ValueError(
                "max_adapters needs engine vllm (the transformers engine serves one merged "
                "adapter per app)"
            )
        if self.max_adapters_per_tenant is not None and (
            self.max_adapters_per_tenant > self.max_adapters
        ):
            raise ValueError("max_adapters_per_tenant must be at most max_adapters")
        return self

    @property
    def adapters_per_tenant(self) -> int:
        """The slots one tenant's adapters may take on a replica."""
        if self.max_adapters_per_tenant is not None:
            return self.max_adapters_per_tenant
        return (self.max_adapters + 1) // 2

    @property
    def replica_options(self) -> ReplicaOptions:
        """Just the options, from this or any model that extends them."""
        return ReplicaOptions.model_validate(self.option_values())

    def option_values(self) -> dict[str, object]:
        """The options as plain JSON-able data (what a stored row holds)."""
        return {name: getattr(self, name) for name in ReplicaOptions.model_fields}
