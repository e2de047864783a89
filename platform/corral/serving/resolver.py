"""From (tenant, model name) to the model and its Serve handle: what every inference
request asks first.

Resolution order: the tenant's registered model of that name first, then the file models
(by name or alias). So a tenant may register a name a file model also answers to (an LLM
or a reward model, e.g. its own `llama3_405b_reward`), and for that tenant, and only that
tenant, its own model wins. Kinds are checked after the name is resolved: a caller asks
for the kind it can use (inference an `llm`, reward scoring a `reward` model), and a name
that resolves to another kind is the caller's mistake (InvalidRequest, 422); it does not
fall through to a file model of the same name.

What the database says about a (tenant, name) is kept for RESOLVE_CACHE_S; this process's
own changes drop the entry at once (`forget`), another API process's show up within that
time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from ray.serve.handle import DeploymentHandle

from corral.errors import InvalidRequest, NotFound
from corral.serving.catalog import ModelSpec, file_app_name, tenant_app_name
from corral.serving.deployer import ServeDeployer
from corral.store.db import Database
from corral.store.models import RegisteredModel, ServedModelStore
from serve_apps.options import ModelKind

Source = Literal["file", "registered"]
RESOLVE_CACHE_S = 5.0
RESOLVE_CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    app_name: str
    spec: ModelSpec
    source: Source = "file"
    source_job_uuid: str | None = None
    # The owner of a registered model; None for a file model (shared).
    tenant: str | None = None


def spec_of(model: RegisteredModel) -> ModelSpec:
    """The ModelSpec a registered model is served with."""
    return ModelSpec.model_validate(
        {
            "name": model.name,
            "kind": model.kind,
            # ModelLocation reads a stored path back as a Path and a storage URI as it is.
            "checkpoint_dir": model.checkpoint_dir,
            "adapter_dir": model.adapter_dir,
            "score_weights": model.score_weights,
            **model.options.option_values(),
        }
    )


def resolved_registered(model: RegisteredModel) -> ResolvedModel:
    return ResolvedModel(
        name=model.name,
        app_name=tenant_app_name(model.tenant, model.name),
        spec=spec_of(model),
        source="registered",
        source_job_uuid=model.source_job_uuid,
        tenant=model.tenant,
    )


def check_kind(model: ResolvedModel, kind: ModelKind) -> None:
    """InvalidRequest unless `model` is of `kind` (it cannot answer that kind's calls)."""
    if model.spec.kind != kind:
        raise InvalidRequest(
            f"model {model.name[:200]!r} is a {model.spec.kind} model, not {_a(kind)}"
        )


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


class ModelResolver:
    """Resolves names to models (file models as the models file says them; the stored
    scales of file models matter for deploying, not for finding them)."""

    def __init__(
        self, *, database: Database, deployer: ServeDeployer, file_models: Iterable[ModelSpec]
    ) -> None:
        file_models = list(file_models)
        self._db = database
        self._deployer = deployer
        self._file_models = MappingProxyType({spec.name: spec for spec in file_models})
        self._file_names = {name: spec.name for spec in file_models for name in spec.names}
        self._lock = threading.Lock()
        # (tenant, name) -> (when read, the registered model or None).
        self._recent: dict[tuple[str, str], tuple[float, ResolvedModel | None]] = {}

    @property
    def file_models(self) -> Mapping[str, ModelSpec]:
        """The file models by their own name, as the models file says them."""
        return self._file_models

    def file_model_named(self, name: str) -> str | None:
        """The own name of the file model that answers to `name` (a name or an alias)."""
        return self._file_names.get(name)

    def resolve(self, *, tenant: str, model: str, fresh: bool = False) -> ResolvedModel:
        """A model by name or alias: the tenant's registered models first, then the file
        models. NotFound for anything else. `fresh` reads the database."""
        registered = self._registered(tenant, model, fresh=fresh)
        if registered is not None:
            return registered
        name = self._file_names.get(model)
        if name is None:
            raise NotFound(f"no model {model[:200]!r}")
        return ResolvedModel(name, file_app_name(name), self._file_models[name], "file")

    def handle_for(
        self, *, tenant: str, model: str, kind: ModelKind = "llm"
    ) -> DeploymentHandle[Any]:
        """The Serve handle of the app answering for `model`, which must be of `kind`
        (the inference and scoring services' entry point). NotFound for an unknown
        model, InvalidRequest for one of another kind, ModelUnavailable (503) when its
        app is not deployed."""
        resolved = self.resolve(tenant=tenant, model=model)
        check_kind(resolved, kind)
        return self._deployer.handle(resolved.app_name)

    def forget(self, tenant: str, name: str) -> None:
        """Drop what is kept about (tenant, name): this process just changed it."""
        with self._lock:
            self._recent.pop((tenant, name), None)

    def _registered(self, tenant: str, model: str, *, fresh: bool) -> ResolvedModel | None:
        key = (tenant, model)
        now = time.monotonic()
        cached = self._recent.get(key)
        if cached is not None and not fresh and now - cached[0] < RESOLVE_CACHE_S:
            return cached[1]
        with self._db.transaction() as session:
            stored = ServedModelStore(session).get(tenant=tenant, name=model)
        found = resolved_registered(stored) if stored is not None else None
        with self._lock:
            if len(self._recent) >= RESOLVE_CACHE_ENTRIES:
                self._recent.clear()  # names come from requests: keep the memory bounded
            self._recent[key] = (now, found)
        return found
