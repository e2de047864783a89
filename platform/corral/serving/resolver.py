"""From (tenant, model name) to the model and its Serve handle: what every inference
request asks first.

Resolution order: the tenant's registered model of that name first, then the file models
(by name or alias). So a tenant may register a name a file model also answers to (an LLM
or a reward model, e.g. its own `llama3_405b_reward`), and for that tenant, and only that
tenant, its own model wins. Kinds are checked after the name is resolved: a caller asks
for the kind it can use (inference an `llm`, reward scoring a `reward` model), and a name
that resolves to another kind is the caller's mistake (InvalidRequest, 422); it does not
fall through to a file model of the same name.

A LoRA adapter registered over a served base with adapter slots (engine vllm,
`max_adapters`) rides on that base: it resolves to the base's app, with its `AdapterRef`,
and its handle carries the adapter as Serve's multiplexed model id, so every caller that
takes a handle here (inference, the OpenAI routes, agents, shields) sends its requests
through the adapter without knowing of it (`serve_apps.llm.with_routed_adapter`). The
adapter's name is its tenant's own: another tenant's "mine" is another row, another id.

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
from serve_apps.engines.protocol import AdapterRef
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
    # An adapter riding on a base's replicas (`app_name` is the base's): which adapter,
    # and the base's own name.
    adapter: AdapterRef | None = None
    base_model: str | None = None


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


def resolved_registered(model: RegisteredModel, base: ResolvedModel | None = None) -> ResolvedModel:
    """How a registered model is served: by an app of its own, or, for an adapter that
    rides on a base (`base`, from `base_of`; None if that base is gone), by the base's
    app, with the base's options."""
    rides = model.rides_on
    if rides is not None:
        assert model.adapter_dir is not None  # only adapters ride on a base
        if base is not None:
            spec = ModelSpec.model_validate(
                base.spec.model_dump()
                | {"name": model.name, "aliases": [], "adapter_dir": model.adapter_dir}
            )
            app_name = base.app_name
        else:  # its base is no longer served: its handle says the app is not deployed
            spec = spec_of(model)
            app_name = (
                file_app_name(rides.base_model)
                if rides.base_source == "file"
                else tenant_app_name(model.tenant, rides.base_model)
            )
        return ResolvedModel(
            name=model.name,
            app_name=app_name,
            spec=spec,
            source="registered",
            source_job_uuid=model.source_job_uuid,
            tenant=model.tenant,
            adapter=AdapterRef(
                adapter_id=rides.adapter_id, tenant=model.tenant, path=model.adapter_dir
            ),
            base_model=rides.base_model,
        )
    return ResolvedModel(
        name=model.name,
        app_name=tenant_app_name(model.tenant, model.name),
        spec=spec_of(model),
        source="registered",
        source_job_uuid=model.source_job_uuid,
        tenant=model.tenant,
    )


def base_of(
    model: RegisteredModel, *, file_models: Mapping[str, ModelSpec], store: ServedModelStore
) -> ResolvedModel | None:
    """The base a riding adapter's requests go to (None when it rides on none, or its
    base is no longer served): a file model by its own name, or the same tenant's own
    registered model."""
    rides = model.rides_on
    if rides is None:
        return None
    if rides.base_source == "file":
        spec = file_models.get(rides.base_model)
        if spec is None:
            return None
        return ResolvedModel(rides.base_model, file_app_name(rides.base_model), spec, "file")
    stored = store.get(tenant=model.tenant, name=rides.base_model)
    if stored is None or stored.rides_on is not None:
        return None
    return resolved_registered(stored)


def check_kind(model: ResolvedModel, kind: ModelKind) -> None:
    """InvalidRequest unless `model` is of `kind` (it cannot answer that kind's calls)."""
    if model.spec.kind != kind:
        raise InvalidRequest(
            f"model {model.name[:200]!r} is {_KINDS[model.spec.kind]}, not {_KINDS[kind]}"
        )


_KINDS: dict[ModelKind, str] = {
    "llm": "an llm",
    "reward": "a reward model",
    "embedding": "an embedding model",
    "classifier": "a classifier",
}


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
        handle = self._deployer.handle(resolved.app_name)
        if resolved.adapter is not None:
            # The base's handle (its router shared) with the adapter on every request.
            return handle.options(multiplexed_model_id=resolved.adapter.key())
        return handle

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
            store = ServedModelStore(session)
            stored = store.get(tenant=tenant, name=model)
            found = None
            if stored is not None:
                base = base_of(stored, file_models=self._file_models, store=store)
                found = resolved_registered(stored, base)
        with self._lock:
            if len(self._recent) >= RESOLVE_CACHE_ENTRIES:
                self._recent.clear()  # names come from requests: keep the memory bounded
            self._recent[key] = (now, found)
        return found
