"""What a synthetic data generation run is asked to do, in pydantic only (the API process
validates requests with it and imports neither Ray Data nor torch).

The spec's `/synthetic_data_generation/generate` takes `prompts`, a `filtering_function`
and an opaque `reward_scoring` object. Corral gives that object a schema,
`SyntheticDataSettings`: which model generates and how (`generation`), which reward
model scores (`model`), and every filter's parameters (`filter`), each named and
defaulted. Unknown keys are refused at every level (422), so a misspelt parameter never
silently falls back to its default.

Filters act per prompt, on its `num_candidates` scored candidates (`jobs/sdg/filters.py`
implements them; docs in `docs/synthetic_data.md`):

- `none`: keeps every candidate.
- `random`: keeps `keep_count` candidates per prompt if given, else
  ceil(`keep_fraction` x k), chosen uniformly at random (seeded).
- `top_k`: keeps the `top_k` best (ties: the earlier candidate first).
- `top_p`: softmax of the scores at `softmax_temperature`; keeps the best candidates
  whose cumulative share of that mass first reaches `top_p` (at least one).
- `top_k_top_p`: what both keep: the best min(top_k, n_top_p).
- `sigmoid`: keeps each candidate with probability
  sigma((score - threshold) / sigmoid_temperature), seeded.

Randomness is seeded per prompt from (`filter.seed` or `generation.seed`, the prompt's
index in the request), so a run's output does not depend on how it was batched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs.report_target import ReportTarget
from serve_apps.model_cache import StorageOptions

FilteringFunction = Literal["none", "random", "top_k", "top_p", "top_k_top_p", "sigmoid"]
DEFAULT_GENERATION_MODEL = "llama3_8b_chat"
DEFAULT_REWARD_MODEL = "llama3_405b_reward"
MAX_CANDIDATES = 64


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GenerationSettings(_Settings):
    """How the k candidates of each prompt are generated."""

    model: str = Field(default=DEFAULT_GENERATION_MODEL, min_length=1, max_length=200)
    num_candidates: int = Field(default=4, ge=1, le=MAX_CANDIDATES)
    max_tokens: int = Field(default=64, ge=1, le=4096)
    # The spec's sampling strategies; greedy gives k equal candidates (seeds do not matter).
    strategy: Literal["greedy", "top_p", "top_k"] = "top_p"
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=100_000)
    # Candidate j of prompt i is sampled with a seed derived from (seed, i, j).
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class FilterSettings(_Settings):
    """Every filter's parameters; each filter reads only its own (see the module doc)."""

    # random
    keep_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    keep_count: int | None = Field(default=None, ge=1, le=MAX_CANDIDATES)
    # top_k, top_k_top_p
    top_k: int = Field(default=1, ge=1, le=MAX_CANDIDATES)
    # top_p, top_k_top_p
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    softmax_temperature: float = Field(default=1.0, gt=0.0, le=1e6)
    # sigmoid
    threshold: float = Field(default=0.0, ge=-1e9, le=1e9)
    sigmoid_temperature: float = Field(default=1.0, gt=0.0, le=1e6)
    # random, sigmoid; None: the generation seed
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


class SyntheticDataSettings(_Settings):
    """The spec's opaque `reward_scoring` object, as Corral reads it."""

    # The reward model's name (a served model of kind "reward").
    model: str = Field(default=DEFAULT_REWARD_MODEL, min_length=1, max_length=200)
    generation: GenerationSettings = GenerationSettings()
    filter: FilterSettings = FilterSettings()


class PipelineConfig(_Settings):
    """One pipeline run, resolved by the API: the Serve apps to call (the tenant's own
    registered models resolved first, as for inference) and how hard to push them."""

    filtering_function: FilteringFunction = "none"
    settings: SyntheticDataSettings = SyntheticDataSettings()
    generation_app: str = Field(min_length=1)
    reward_app: str = Field(min_length=1)
    # Prompts per Ray Data batch (each becomes num_candidates generations).
    batch_size: int = Field(default=8, ge=1, le=4096)
    # The most requests the pipeline has in flight to each app at once: its share of the
    # replicas, so interactive traffic is not starved.
    max_in_flight: int = Field(default=16, ge=1, le=4096)


class PromptTurn(_Settings):
    """A prompt message as the reward model's chat template takes it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class PromptInput(_Settings):
    """One prompt, prepared by the API: what the generating model is sent (the Llama 3
    prompt, ending with the assistant's header) and what the reward model renders before
    each candidate (the prompt's messages). `index` is its place in the request: output
    comes back by it, and seeds are derived from it."""

    index: int = Field(ge=0)
    generation_prompt: str = Field(min_length=1)
    messages: tuple[PromptTurn, ...] = Field(min_length=1)


DatasetFormat = Literal["sft", "dpo"]


class DatasetOutput(_Settings):
    """The dataset a generation job writes and registers for its tenant.

    `sft`: one row per prompt with any kept candidate, column `dialog` (the prompt's
    messages, then the best kept candidate as the assistant's reply). `dpo`: columns
    `prompt`, `chosen` (the best kept candidate) and `rejected` (the lowest-scored
    candidate of that prompt); a prompt whose chosen score does not exceed the rejected
    one by more than `min_margin` gives no row (ties never do)."""

    format: DatasetFormat = "dpo"
    # None: the job's uuid.
    dataset_id: str | None = Field(default=None, min_length=1, max_length=200)
    min_margin: float = Field(default=0.0, ge=0.0, le=1e9)


class SyntheticDataJobConfig(_Settings):
    """A generation job's launch config (stored in its row; `jobs/sdg/job.py` runs it).
    `job_key` and `report_to` are added by `jobs.launch` as for every recipe."""

    job_key: str
    # Where the job reports; never dumped, so never stored (it carries the job's token).
    report_to: ReportTarget | None = Field(default=None, exclude=True)
    pipeline: PipelineConfig
    prompts: tuple[PromptInput, ...] = Field(min_length=1)
    output: DatasetOutput = DatasetOutput()
    # The job's own directory: its batches' output (what a resumed attempt skips) and the
    # dataset; in object storage under `output_uri` when storage is not a directory.
    output_dir: Path
    output_uri: str | None = None
    storage: StorageOptions = StorageOptions()
