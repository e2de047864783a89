"""Corral's settings: one class, read once from the environment and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class ApiKey:
    """A bearer key and the tenant whose objects it may see. An operator key
    (`CORRAL_OPERATOR_KEYS`) also may scale the shared models and see cluster-wide views;
    on every other route it acts as its tenant."""

    tenant: str
    key: str
    operator: bool = False


class Settings(BaseSettings):
    """Everything configurable, from `CORRAL_*` variables (and `RAY_ADDRESS`)."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", frozen=True, extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".corral")
    database_url: str | None = None
    # Ray's own variable: unset means the embedded default, a local head under `home`.
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("RAY_ADDRESS", "CORRAL_RAY_ADDRESS")
    )
    # "tenant:key,tenant:key" or bare "key" (tenant "default"); empty means no auth.
    api_keys: str = ""
    # The same format: keys of operators, who also scale the shared (file) models and see
    # every tenant's models. With neither variable set, the one local caller is both.
    operator_keys: str = ""
    models_file: Path | None = None
    # Directories that `file://` dataset URLs may point into, os.pathsep-separated.
    dataset_roots: str = ""
    fetch_max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    fetch_timeout_s: float = Field(default=30.0, gt=0)
    # Plain http:// dataset URLs are refused unless this is set.
    fetch_allow_http: bool = False
    # PEM CA bundle that https:// dataset fetches trust instead of the default roots.
    fetch_ca_bundle: Path | None = None
    # Where the Ray Jobs API answers (the head's dashboard, e.g. http://head:8265). Unset:
    # the embedded head's, or port 8265 on the host of RAY_ADDRESS.
    ray_jobs_url: str | None = None
    # Fine-tuning jobs: Ray Train workers per job, a GPU each or not, the ZeRO stage used
    # when a request asks for neither memory_efficient_fsdp_wrap nor fsdp_cpu_offload
    # (unset: plain DDP), training precision and the longest tokenized dialog.
    train_workers: int = Field(default=2, ge=1, le=1024)
    train_use_gpu: bool = False
    train_zero_stage: int | None = Field(default=None, ge=0, le=3)
    train_dtype: Literal["float32", "bfloat16"] = "float32"
    train_max_seq_len: int = Field(default=2048, ge=8)
    # How often the API settles unfinished jobs against Ray (it also does at start-up) and
    # admits queued ones. With several API replicas on one database only the holder of
    # the store's lease does, renewed each pass; another takes over once it has not been
    # renewed for `lease_ttl_s` (unset: three intervals).
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    lease_ttl_s: float | None = Field(default=None, gt=0)
    # Admission (docs/admission.md): the most CPUs and GPUs the cluster can ever have, an
    # autoscaler's maximum (0: what Ray reports now); a job needing more is refused (422).
    # Per tenant (0: unlimited): jobs admitted and unfinished at once, and the GPUs they
    # hold together; a tenant at a limit waits, others go on.
    cluster_max_cpus: float = Field(default=0.0, ge=0)
    cluster_max_gpus: float = Field(default=0.0, ge=0)
    tenant_max_running_jobs: int = Field(default=0, ge=0)
    tenant_max_job_gpus: float = Field(default=0.0, ge=0)
    # `corral serve`'s log lines: "text" for people, "json" one object per line (with the
    # request id and job of each line) for a log pipeline. See docs/observability.md.
    log_format: Literal["text", "json"] = "text"
    # How long `/ready` waits for each backend (database, Ray, Milvus) before it says so.
    readiness_timeout_s: float = Field(default=2.0, gt=0, le=60)
    # Where jobs write checkpoints and TensorBoard files (corral.storage): a directory
    # every node sees (local, NFS) or s3://bucket/prefix, gs://bucket/prefix. Unset:
    # `checkpoints_dir`. S3 and GCS credentials come from each machine's standard chain.
    storage_uri: str | None = None
    # An S3-compatible endpoint other than AWS (MinIO, Ceph): http(s)://host:port.
    storage_s3_endpoint: str | None = None
    storage_s3_region: str | None = None
    # How long the presigned URLs of S3 artifacts stay valid (SigV4 allows 7 days).
    storage_url_expiry_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    # Where a serving replica caches models it downloads from object storage, on its own
    # node. Unset: ~/.cache/corral/models there.
    model_cache_dir: Path | None = None
    # The interpreter of the env `engine: vllm` replicas run in (scripts/setup-vllm.sh
    # builds one). Unset: the repository's .venv-vllm (serve_apps.vllm_env).
    vllm_python: Path | None = None
    # What each tenant's registered models may ask for (`corral.services.models`): per
    # model, max_replicas and max_replicas x gpus_per_replica; over all of a tenant's
    # registered models, the sums of those. Registration or a scale beyond them is refused
    # (403 quota_exceeded). Operators' scaling of the shared file models is not limited.
    tenant_max_replicas_per_model: int = Field(default=32, ge=1)
    tenant_max_gpus_per_model: float = Field(default=64.0, ge=0)
    tenant_max_replicas: int = Field(default=256, ge=1)
    tenant_max_gpus: float = Field(default=256.0, ge=0)
    # Synthetic data generation (corral.services.synthetic_data): the most generations
    # (prompts x num_candidates) the synchronous /synthetic_data_generation/generate
    # serves (beyond: 422 naming the job route), the most prompts one job takes, prompts
    # per pipeline batch, and the most requests a run keeps in flight to each model app
    # (its share of the replicas, so interactive traffic is not starved).
    sdg_max_sync_generations: int = Field(default=256, ge=1)
    sdg_max_job_prompts: int = Field(default=100_000, ge=1)
    sdg_batch_size: int = Field(default=8, ge=1, le=4096)
    sdg_max_in_flight: int = Field(default=16, ge=1, le=4096)
    # Memory banks (corral.services.memory_banks) on Milvus: a Milvus server by URI (and
    # token), or, unset, the embedded `milvus-lite server` under `home/milvus`
    # (corral.milvus_server, loopback only, no authentication). A bank's chunks are token
    # windows of its embedding model (a served `embedding` model) with this overlap;
    # per-bank values go through `POST /memory_banks/configure`.
    milvus_uri: str | None = None
    milvus_token: str | None = None
    memory_embedding_model: str = "all-minilm-l6-v2"
    memory_chunk_tokens: int = Field(default=192, ge=16, le=8192)
    memory_chunk_overlap_tokens: int = Field(default=48, ge=0, le=4096)
    memory_max_document_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    # Agents (corral.agents): the served models behind the model-backed shields (a
    # shield's `params.model` may name another model the tenant can use); unset and not
    # named in params, creating an agent with that shield is a 422.
    llama_guard_model: str | None = None
    prompt_guard_model: str | None = None
    agent_max_inference_steps: int = Field(default=10, ge=1, le=100)
    # Built-in tools' providers. web_search speaks the Brave Search API, image_gen the
    # OpenAI Images API; without a key the tool is unavailable (a clear error, never an
    # empty result). The URLs are the operator's, never a user's.
    web_search_api_key: str | None = None
    web_search_url: str = "https://api.search.brave.com/res/v1/web/search"
    image_gen_api_key: str | None = None
    image_gen_url: str = "https://api.openai.com/v1/images/generations"
    image_gen_model: str = "gpt-image-1"
    tool_timeout_s: float = Field(default=30.0, gt=0, le=600)
    # code_interpreter runs Python under bubblewrap (no network, a throwaway directory,
    # an empty environment) with these limits; where no sandbox can be made it refuses.
    code_interpreter_python: str = "python3"
    code_interpreter_cpu_s: int = Field(default=10, ge=1, le=3600)
    code_interpreter_memory_mb: int = Field(default=512, ge=16, le=1 << 20)
    code_interpreter_wall_s: float = Field(default=20.0, gt=0, le=3600)
    code_interpreter_output_bytes: int = Field(default=64 * 1024, ge=256, le=1 << 26)
    # The jobs dashboard's sign-in (corral.sessions): the session cookie lasts this long,
    # is marked Secure on https requests (always, with session_cookie_secure: set it
    # behind a TLS-terminating proxy) and is signed with session_secret (unset: a random
    # secret made once in `home/session_secret`, 0600; API replicas that do not share
    # `home` need the same value here).
    session_max_age_s: int = Field(default=8 * 3600, ge=60, le=30 * 24 * 3600)
    session_cookie_secure: bool = False
    session_secret: str | None = Field(default=None, min_length=32, repr=False)
    # Scoped job credentials (docs/job_credentials.md): the secret each job's token is
    # derived from (unset: a random one kept in `home/job_token_secret`; changing it
    # invalidates running jobs' tokens), and the URL jobs reach the API's internal routes
    # at (unset: the address `corral serve` listens on, loopback for 0.0.0.0/::).
    job_token_secret: SecretStr | None = None
    internal_url: str | None = None

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def resolved_lease_ttl_s(self) -> float:
        return self.lease_ttl_s if self.lease_ttl_s is not None else 3 * self.reconcile_interval_s

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'corral.db'}"

    @property
    def checkpoints_dir(self) -> Path:
        """Where fine-tuning jobs write their checkpoints, one directory per job."""
        return self.home / "checkpoints"

    @property
    def resolved_storage_uri(self) -> str:
        """The storage root: `storage_uri`, or the checkpoints directory."""
        return self.storage_uri or str(self.checkpoints_dir)

    @field_validator("storage_uri")
    @classmethod
    def _check_storage_uri(cls, value: str | None) -> str | None:
        if value is not None:
            from corral.storage import Storage

            Storage(value)  # InvalidLocation (a ValueError) names what is wrong
        return value

    @field_validator("storage_s3_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
                raise ValueError("CORRAL_STORAGE_S3_ENDPOINT must be http(s)://host[:port]")
        return value

    @field_validator("job_token_secret")
    @classmethod
    def _check_job_token_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("CORRAL_JOB_TOKEN_SECRET must be at least 32 characters")
        return value

    @field_validator("internal_url")
    @classmethod
    def _check_internal_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
                raise ValueError("CORRAL_INTERNAL_URL must be http(s)://host[:port][/prefix]")
            return value.rstrip("/")
        return value

    @property
    def resolved_models_file(self) -> Path:
        return self.models_file if self.models_file is not None else self.home / "models.yaml"

    @property
    def resolved_dataset_roots(self) -> tuple[Path, ...]:
        if not self.dataset_roots:
            return (self.home / "datasets",)
        return tuple(
            Path(p).expanduser().resolve() for p in self.dataset_roots.split(os.pathsep) if p
        )

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: str) -> str:
        parse_api_keys(value)
        return value

    @field_validator("operator_keys")
    @classmethod
    def _check_operator_keys(cls, value: str) -> str:
        parse_api_keys(value, operator=True)
        return value

    @model_validator(mode="after")
    def _keys_are_distinct(self) -> Settings:
        tenant_keys = {key.key for key in self.parsed_api_keys}
        if any(key.key in tenant_keys for key in self.parsed_operator_keys):
            # One key, two meanings: which one was meant cannot be guessed.
            raise ValueError("a key is in both CORRAL_API_KEYS and CORRAL_OPERATOR_KEYS")
        return self

    @model_validator(mode="after")
    def _lease_outlasts_a_pass(self) -> Settings:
        if self.lease_ttl_s is not None and self.lease_ttl_s <= self.reconcile_interval_s:
            # The holder renews once a pass: a shorter lease would pass between replicas.
            raise ValueError("CORRAL_LEASE_TTL_S must exceed CORRAL_RECONCILE_INTERVAL_S")
        return self

    @property
    def parsed_api_keys(self) -> tuple[ApiKey, ...]:
        """The tenants' keys (CORRAL_API_KEYS)."""
        return parse_api_keys(self.api_keys)

    @property
    def parsed_operator_keys(self) -> tuple[ApiKey, ...]:
        """The operators' keys (CORRAL_OPERATOR_KEYS)."""
        return parse_api_keys(self.operator_keys, operator=True)

    @property
    def bearer_keys(self) -> tuple[ApiKey, ...]:
        """Every key the server accepts; none at all means no authentication."""
        return self.parsed_api_keys + self.parsed_operator_keys


def parse_api_keys(text: str, *, operator: bool = False) -> tuple[ApiKey, ...]:
    """`tenant:key,tenant:key`; a bare `key` belongs to the default tenant."""
    variable = "CORRAL_OPERATOR_KEYS" if operator else "CORRAL_API_KEYS"
    keys: list[ApiKey] = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        tenant, sep, key = entry.partition(":")
        if not sep:
            tenant, key = DEFAULT_TENANT, entry
        if not key or not tenant:
            raise ValueError(f"malformed {variable} entry {entry!r}")
        keys.append(ApiKey(tenant=tenant, key=key, operator=operator))
    return tuple(keys)
