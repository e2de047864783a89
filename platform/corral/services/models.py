"""The models service: which models a tenant can use, registering, scaling and deleting
them, and starting them with the server.

File models (the models file, or the embedded default) are shared by every tenant and
start with the server. Registered models belong to one tenant; their `served_models` row
is the truth, and `restore` (part of `start`) deploys every row again, so a restarted API
server serves them again (and, Serve's code version being unchanged, keeps the replicas
that are still running).

Registration stores the row first, so two concurrent registrations of one name meet at
the primary key, then deploys and waits for the app to run. If the deploy fails, the row
and the app are both removed and the caller gets the reason: nothing stays half
registered, and the same request may simply be sent again. What a tenant's registered
models ask for stays within the operator's per-tenant limits (`TenantQuota`): beyond
them a registration or scale is QuotaExceeded and stores nothing.

A tenant may register a name a file model also answers to: for that tenant, its own model
wins (`corral.serving.resolver`). File models are shared, so only an operator scales them
(and tenant quotas do not apply); the new bounds are stored (`file_model_scales`) and win
over the models file's from then on, in every API process and at every start-up, until
the next scale. Nobody deletes a file model through the API: the models file is the truth
for which shared models exist.

A LoRA adapter registered over the checkpoint of a served model with adapter slots
(engine vllm, `max_adapters` > 0: a file model, or the tenant's own registered base) rides
on that base instead: its row records the base and a new adapter id, nothing is deployed,
and the base's replicas load it at its first request (`serve_apps.adapters` decides which
stay loaded). Its replicas are the base's, so it takes none of the tenant's quota, gives
no replica options of its own, and is not scaled by itself: `/models/scale` on it is a
Conflict that names the base (an operator scales a shared one; a tenant its own).
Deleting it forgets the row; replicas unload it when its slot is next needed. A base with
adapters riding on it is not deleted before them.

Mutations (start, register, scale, unregister) take one lock: they are rare, and a deploy
waiting for its app must not race a scale or delete of the same app. Reads do not.
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.api.models import ModelInfo, RegisterModelRequest
from corral.config import Settings
from corral.errors import Conflict, Forbidden, InvalidRequest, NotFound, QuotaExceeded
from corral.services.model_dirs import ModelDirs
from corral.serving.adapters import AdapterMismatch, check_adapter
from corral.serving.catalog import ModelRoots, ModelSpec, ServedName, file_app_name
from corral.serving.deployer import AppState, EngineFactory, ModelDeployError, ServeDeployer
from corral.serving.kinds import NotServable, check_servable
from corral.serving.resolver import (
    ModelResolver,
    ResolvedModel,
    base_of,
    resolved_registered,
    spec_of,
)
from corral.storage import Storage
from corral.store.db import Database
from corral.store.jobs import JobStore
from corral.store.models import RegisteredModel, RidesOn, ServedModelStore
from serve_apps.engines.labels import config_labels, label_weights
from serve_apps.options import MAX_REPLICAS, ReplicaOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TenantQuota:
    """What one tenant's registered models may ask for (`CORRAL_TENANT_MAX_*`): per model,
    its max_replicas and max_replicas x gpus_per_replica; in all, the sums of those over
    the tenant's registered models."""

    replicas_per_model: int = 32
    gpus_per_model: float = 64.0
    replicas: int = 256
    gpus: float = 256.0

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantQuota:
        return cls(
            replicas_per_model=settings.tenant_max_replicas_per_model,
            gpus_per_model=settings.tenant_max_gpus_per_model,
            replicas=settings.tenant_max_replicas,
            gpus=settings.tenant_max_gpus,
        )

    def check(self, name: str, options: ReplicaOptions, others: Iterable[ReplicaOptions]) -> None:
        """QuotaExceeded if model `name` with `options`, beside the tenant's `others`,
        asks for more than this quota allows."""
        gpus = options.max_replicas * options.gpus_per_replica
        if options.max_replicas > self.replicas_per_model:
            raise QuotaExceeded(
                f"model {name!r}: max_replicas {options.max_replicas} is above the "
                f"{self.replicas_per_model} replicas a tenant's model may have"
            )
        if gpus > self.gpus_per_model:
            raise QuotaExceeded(
                f"model {name!r}: {gpus:g} GPUs (max_replicas x gpus_per_replica) is above "
                f"the {self.gpus_per_model:g} GPUs a tenant's model may have"
            )
        others = builtins.list(others)
        total_replicas = options.max_replicas + sum(o.max_replicas for o in others)
        total_gpus = gpus + sum(o.max_replicas * o.gpus_per_replica for o in others)
        if total_replicas > self.replicas:
            raise QuotaExceeded(
                f"model {name!r}: your registered models would have {total_replicas} "
                f"replicas at most (max_replicas summed); the limit is {self.replicas}"
            )
        if total_gpus > self.gpus:
            raise QuotaExceeded(
                f"model {name!r}: your registered models would take {total_gpus:g} GPUs at "
                f"most (max_replicas x gpus_per_replica summed); the limit is {self.gpus:g}"
            )


class ModelService:
    def __init__(
        self,
        *,
        database: Database,
        deployer: ServeDeployer,
        resolver: ModelResolver,
        dirs: ModelDirs,
        quota: TenantQuota | None = None,
        engine_factory: EngineFactory | None = None,
        registration_defaults: ReplicaOptions | None = None,
    ) -> None:
        """`engine_factory`: an engine for every app instead of the one each names (tests).
        `registration_defaults`: the options a registration leaves out (ReplicaOptions'
        own defaults unless given)."""
        self._db = database
        self._deployer = deployer
        self._resolver = resolver
        self._dirs = dirs
        self._quota = quota or TenantQuota()
        self._engine_factory = engine_factory
        self._defaults = registration_defaults or ReplicaOptions()
        self._lock = threading.RLock()

    @property
    def resolver(self) -> ModelResolver:
        """What inference resolves model names with."""
        return self._resolver

    @property
    def deployer(self) -> ServeDeployer:
        """Where the apps' states are read: a service that needs a model running now."""
        return self._deployer

    # ------------------------------------------------------------------ start-up

    def start(self) -> None:
        """Deploy every file model and restore the registered ones. A file model that does
        not start is an error; a registered model that does not start is logged and
        listed with its status."""
        with self._lock:
            with self._db.transaction() as session:
                specs = self._file_specs(session)
            for spec in specs.values():
                if (
                    isinstance(spec.checkpoint_dir, Path)
                    and not (spec.checkpoint_dir / "config.json").is_file()
                ):
                    raise ModelDeployError(
                        f"model {spec.name!r}: no checkpoint (config.json) in {spec.checkpoint_dir}"
                    )
                in_file = self._resolver.file_models[spec.name]
                if (spec.min_replicas, spec.max_replicas) != (
                    in_file.min_replicas,
                    in_file.max_replicas,
                ):
                    log.info(
                        "model %s: replicas %d..%d as an operator scaled it (the models file "
                        "says %d..%d)",
                        spec.name,
                        spec.min_replicas,
                        spec.max_replicas,
                        in_file.min_replicas,
                        in_file.max_replicas,
                    )
                self._deploy(spec, file_app_name(spec.name), blocking=False)
            restored = self._deploy_registered()
            names = [file_app_name(name) for name in self._resolver.file_models]
            outcome = self._deployer.wait_all([*names, *restored])
            for app_name in restored:
                if outcome[app_name] is not None:
                    log.error("registered model app did not start: %s", outcome[app_name])
            failed = [str(outcome[name]) for name in names if outcome[name] is not None]
            if failed:
                raise ModelDeployError("; ".join(failed))

    def restore(self) -> None:
        """Deploy every registered model again from its row, waiting for them."""
        with self._lock:
            for app_name, error in self._deployer.wait_all(self._deploy_registered()).items():
                if error is not None:
                    log.error("registered model app %s did not start: %s", app_name, error)

    def _deploy_registered(self) -> builtins.list[str]:
        with self._db.transaction() as session:
            stored = ServedModelStore(session).find(tenant=None)
        app_names = []
        for model in stored:
            if model.rides_on is not None:
                continue  # served by its base's app
            resolved = resolved_registered(model)
            self._deploy(resolved.spec, resolved.app_name, blocking=False)
            app_names.append(resolved.app_name)
        return app_names

    # ------------------------------------------------------------------ lookups

    def resolve(self, *, tenant: str, model: str, fresh: bool = False) -> ResolvedModel:
        """See `ModelResolver.resolve` (fine-tuning locates its base model with it)."""
        return self._resolver.resolve(tenant=tenant, model=model, fresh=fresh)

    def checked_dir(self, value: str, field: str, required_file: str, *, tenant: str) -> Path:
        """See `ModelDirs.checked_dir`."""
        return self._dirs.checked_dir(value, field, required_file, tenant=tenant)

    def checked_location(
        self, value: str, field: str, required_file: str, *, tenant: str
    ) -> Path | str:
        """See `ModelDirs.checked_location`."""
        return self._dirs.checked_location(value, field, required_file, tenant=tenant)

    # ------------------------------------------------------------------ changes

    def register(self, *, tenant: str, request: RegisterModelRequest) -> ModelInfo:
        """Serve a checkpoint (or adapter) for one tenant. The same request again is a
        no-op; another request under a registered name is a Conflict."""
        try:
            check_servable(request.kind, request.engine)
            self._deployer.check_engine(request.engine)
        except NotServable as exc:
            raise InvalidRequest(str(exc)) from None
        # What can be told before deploying is the client's fault (422); a deploy that
        # fails after this is the server's condition (ModelDeployError, 503).
        checkpoint_dir = self.checked_location(
            request.checkpoint_dir, "checkpoint_dir", "config.json", tenant=tenant
        )
        adapter_dir = (
            self.checked_location(
                request.adapter_dir, "adapter_dir", "adapter_config.json", tenant=tenant
            )
            if request.adapter_dir is not None
            else None
        )
        base = (
            self._base_to_ride(tenant, request, checkpoint_dir, adapter_dir)
            if adapter_dir is not None
            else None
        )
        wanted = RegisteredModel(
            tenant=tenant,
            name=request.name,
            kind=request.kind,
            checkpoint_dir=str(checkpoint_dir),
            adapter_dir=str(adapter_dir) if adapter_dir is not None else None,
            options=self._options_of(request),
            source_job_uuid=request.source_job_uuid,
            score_weights=request.score_weights,
            rides_on=(
                RidesOn(
                    base_model=base.name,
                    base_source=base.source,
                    adapter_id=uuid.uuid4().hex,
                )
                if base is not None
                else None
            ),
        )
        _check_spec(wanted)
        with self._lock:
            try:
                with self._db.transaction() as session:
                    store = ServedModelStore(session)
                    existing = store.get(tenant=tenant, name=request.name)
                    if existing is not None:
                        _same_or_conflict(existing, wanted)
                        return self._info(self._resolved(existing, store))
                    if request.source_job_uuid is not None:
                        try:
                            JobStore(session).get(request.source_job_uuid, tenant=tenant)
                        except NotFound:
                            raise InvalidRequest(
                                f"no job {request.source_job_uuid[:200]!r}"
                            ) from None
                    if base is None:
                        others = [m.options for m in store.find(tenant=tenant) if not m.rides_on]
                        self._quota.check(request.name, wanted.options, others)
                    store.add(wanted)
            except IntegrityError:
                # A concurrent registration of the same name committed first.
                with self._db.transaction() as session:
                    store = ServedModelStore(session)
                    existing = store.get(tenant=tenant, name=request.name)
                    if existing is None:
                        raise
                    _same_or_conflict(existing, wanted)
                    return self._info(self._resolved(existing, store))

            self._resolver.forget(tenant, request.name)
            if base is not None:  # its base's replicas load it at its first request
                return self._info(resolved_registered(wanted, base))
            resolved = resolved_registered(wanted)
            try:
                self._deploy(resolved.spec, resolved.app_name, blocking=True)
            except BaseException:
                self._forget(tenant, request.name, resolved.app_name)
                raise
            return self._info(resolved)

    def scale(
        self,
        *,
        tenant: str,
        model: str,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        replicas: int | None = None,
        operator: bool = False,
    ) -> ModelInfo:
        """Change a model's replica bounds in place; `replicas=N` pins both to N. Returns
        at once: Serve then adds or removes replicas (`list` shows them), and requests in
        flight finish. A file model is shared: only an `operator` scales it (Forbidden
        otherwise), for every tenant, and its new bounds are stored. A tenant's own model
        stays within its quota."""
        if replicas is not None:
            if min_replicas is not None or max_replicas is not None:
                raise InvalidRequest("give either replicas or min_replicas/max_replicas")
            min_replicas = max_replicas = replicas
        if min_replicas is None and max_replicas is None:
            raise InvalidRequest("give replicas, min_replicas or max_replicas")
        with self._lock:
            resolved = self._resolver.resolve(tenant=tenant, model=model, fresh=True)
            if resolved.base_model is not None:
                raise Conflict(_rides_on_message(resolved))
            if resolved.source == "file":
                if not operator:
                    raise Forbidden(
                        f"model {resolved.name!r} is shared by every tenant (from the models "
                        "file): only an operator key scales it"
                    )
                with self._db.transaction() as session:
                    resolved = replace(resolved, spec=self._file_specs(session)[resolved.name])
            spec = _rescaled(resolved.spec, min_replicas, max_replicas)
            if resolved.source == "file":
                self._store_file_scale(resolved.app_name, spec, scaled_by=tenant)
            else:
                with self._db.transaction() as session:
                    store = ServedModelStore(session)
                    others = [m.options for m in store.find(tenant=tenant) if m.name != spec.name]
                    self._quota.check(spec.name, spec, others)
                    if not store.set_options(tenant=tenant, name=spec.name, options=spec):
                        raise NotFound(f"no model {model!r}")
                    # Inside the transaction: if Serve refuses, the row keeps its bounds.
                    self._deployer.scale(
                        resolved.app_name, spec, engine_factory=self._engine_factory
                    )
            self._resolver.forget(tenant, resolved.name)
            return self._info(replace(resolved, spec=spec))

    def unregister(self, *, tenant: str, model: str, operator: bool = False) -> None:
        """Stop serving a tenant's registered model and forget it. The app goes first: if
        Serve cannot delete it, the row stays and the model is still registered. A file
        model is Forbidden to a tenant; an operator is told to edit the models file."""
        with self._lock:
            with self._db.transaction() as session:
                stored = ServedModelStore(session).get(tenant=tenant, name=model)
            if stored is None:
                in_file = self._resolver.file_model_named(model) is not None
                if in_file and not operator:
                    raise Forbidden(
                        f"model {model!r} is shared by every tenant (from the models file): "
                        "only an operator manages it"
                    )
                if in_file:
                    raise InvalidRequest(
                        f"model {model!r} comes from the models file: remove it there and "
                        "restart the server (to free its replicas now, scale it to "
                        "min_replicas 0)"
                    )
                raise NotFound(f"no model {model[:200]!r}")
            if stored.rides_on is None:
                with self._db.transaction() as session:
                    riders = [
                        m.name
                        for m in ServedModelStore(session).find(tenant=tenant)
                        if m.rides_on is not None
                        and m.rides_on.base_source == "registered"
                        and m.rides_on.base_model == stored.name
                    ]
                if riders:
                    raise Conflict(
                        f"model {stored.name!r} serves the adapters {', '.join(riders)}: "
                        "unregister them first"
                    )
                self._deployer.delete(resolved_registered(stored).app_name)
            # A riding adapter has no app: its base's replicas drop it when they next
            # need its slot (its id is never used again).
            with self._db.transaction() as session:
                ServedModelStore(session).delete(tenant=tenant, name=stored.name)
            self._resolver.forget(tenant, stored.name)

    # ------------------------------------------------------------------ listing

    def list(self, tenant: str, *, all_tenants: bool = False) -> builtins.list[ModelInfo]:
        """The file models (with their stored bounds), then the tenant's registered models
        (every tenant's with `all_tenants`, the operators' view), with their replicas."""
        states = self._deployer.statuses()
        with self._db.transaction() as session:
            store = ServedModelStore(session)
            stored = store.find(tenant=None if all_tenants else tenant)
            files = self._file_specs(session)
            resolved = [
                ResolvedModel(name, file_app_name(name), spec, "file")
                for name, spec in files.items()
            ] + [self._resolved(model, store, files) for model in stored]
        return [self._info(model, states.get(model.app_name)) for model in resolved]

    def model_names(self, *, tenant: str) -> builtins.list[ServedName]:
        """Every name that resolves for `tenant`, once each, with its model's kind: the
        file models under their names and aliases, then the tenant's registered models.
        A registered name that shadows a file model's name is listed once, as the
        tenant's."""
        with self._db.transaction() as session:
            registered = ServedModelStore(session).find(tenant=tenant)
        shadowed = {model.name for model in registered}
        shared = [
            ServedName(name=name, owner=None, kind=spec.kind)
            for spec in self._resolver.file_models.values()
            for name in spec.names
            if name not in shadowed
        ]
        return shared + [
            ServedName(name=model.name, owner=tenant, kind=model.kind) for model in registered
        ]

    # ------------------------------------------------------------------ helpers

    def _resolved(
        self,
        model: RegisteredModel,
        store: ServedModelStore,
        files: Mapping[str, ModelSpec] | None = None,
    ) -> ResolvedModel:
        """How `model` is served (a riding adapter with its base's app and options)."""
        file_models = self._resolver.file_models if files is None else files
        return resolved_registered(model, base_of(model, file_models=file_models, store=store))

    def _base_to_ride(
        self,
        tenant: str,
        request: RegisterModelRequest,
        checkpoint_dir: Path | str,
        adapter_dir: Path | str,
    ) -> ResolvedModel | None:
        """The served base an adapter registration rides on: the tenant's own registered
        model, else a file model, with the same checkpoint, engine vllm and adapter
        slots; None for an app of its own (none such, or engine transformers asked for).
        InvalidRequest for an adapter that does not fit that base (AdapterMismatch), for
        replica options given with it (they are the base's), and for engine vllm asked
        for with no such base."""
        if request.kind != "llm" or (
            "engine" in request.model_fields_set and request.engine != "vllm"
        ):
            return None
        wanted = _location_key(checkpoint_dir)
        with self._db.transaction() as session:
            own = [
                resolved_registered(m)
                for m in ServedModelStore(session).find(tenant=tenant)
                if m.rides_on is None and m.adapter_dir is None
            ]
        shared = [
            ResolvedModel(name, file_app_name(name), spec, "file")
            for name, spec in self._resolver.file_models.items()
            if spec.adapter_dir is None
        ]
        base = next(
            (
                candidate
                for candidate in [*own, *shared]
                if candidate.spec.kind == "llm"
                and candidate.spec.engine == "vllm"
                and candidate.spec.max_adapters > 0
                and _location_key(candidate.spec.checkpoint_dir) == wanted
            ),
            None,
        )
        if base is None:
            if "engine" in request.model_fields_set:
                raise InvalidRequest(
                    "engine vllm serves an adapter over a served base model: register or "
                    "name one with this checkpoint_dir, engine vllm and max_adapters > 0 "
                    "(none is served here), or use engine transformers for an app of the "
                    "adapter's own"
                )
            return None
        given = sorted(
            name
            for name in request.model_fields_set
            if name in ReplicaOptions.model_fields and name != "engine"
        )
        if given:
            raise InvalidRequest(
                f"the adapter rides on the replicas of {base.name!r}, whose options it takes: "
                f"leave out {', '.join(given)}"
            )
        if isinstance(adapter_dir, Path) and isinstance(base.spec.checkpoint_dir, Path):
            try:
                check_adapter(
                    adapter_dir, base.spec.checkpoint_dir, max_rank=base.spec.max_adapter_rank
                )
            except AdapterMismatch as exc:
                raise InvalidRequest(f"adapter_dir: {exc} (base {base.name!r})") from None
        return base

    def _options_of(self, request: RegisterModelRequest) -> ReplicaOptions:
        """The request's options, with the server's defaults for those it leaves out."""
        given = {
            name: getattr(request, name)
            for name in request.model_fields_set
            if name in ReplicaOptions.model_fields
        }
        try:
            return ReplicaOptions.model_validate(self._defaults.option_values() | given)
        except ValidationError as exc:
            raise InvalidRequest(_problems(exc)) from None

    def _forget(self, tenant: str, name: str, app_name: str) -> None:
        """Undo a registration whose deploy failed: the app (if Serve still answers), then
        the row, so no half-registered model stays behind."""
        try:
            self._deployer.delete(app_name)
        except Exception:
            log.exception("could not delete the Serve app %s of a failed registration", app_name)
        with self._db.transaction() as session:
            ServedModelStore(session).delete(tenant=tenant, name=name)
        self._resolver.forget(tenant, name)

    def _deploy(self, spec: ModelSpec, app_name: str, *, blocking: bool) -> None:
        self._deployer.deploy(
            spec, app_name=app_name, engine_factory=self._engine_factory, blocking=blocking
        )

    def _file_specs(self, session: Session) -> dict[str, ModelSpec]:
        """The file models with the replica bounds an operator stored for them."""
        specs = dict(self._resolver.file_models)
        for name, scale in ServedModelStore(session).file_scales().items():
            spec = specs.get(name)
            if spec is not None:  # a model since removed from the file: nothing to apply
                specs[name] = _rescaled(spec, scale.min_replicas, scale.max_replicas)
        return specs

    def _store_file_scale(self, app_name: str, spec: ModelSpec, *, scaled_by: str) -> None:
        """Store a file model's new bounds and apply them, in one transaction: if Serve
        refuses, nothing is stored. Another API process storing the first row for the
        same model at the same time makes the insert fail once; the second try updates."""
        for attempt in range(2):
            try:
                with self._db.transaction() as session:
                    ServedModelStore(session).set_file_scale(
                        name=spec.name,
                        min_replicas=spec.min_replicas,
                        max_replicas=spec.max_replicas,
                        scaled_by=scaled_by,
                    )
                    self._deployer.scale(app_name, spec, engine_factory=self._engine_factory)
                return
            except IntegrityError:
                if attempt == 1:
                    raise

    def _info(self, model: ResolvedModel, state: AppState | None = None) -> ModelInfo:
        spec = model.spec
        if state is None:
            state = self._deployer.status(model.app_name)
        return ModelInfo.model_validate(
            {
                "name": model.name,
                "kind": spec.kind,
                "tenant": model.tenant,
                "aliases": builtins.list(spec.aliases),
                "source": model.source,
                "checkpoint_dir": str(spec.checkpoint_dir),
                "adapter_dir": str(spec.adapter_dir) if spec.adapter_dir is not None else None,
                "source_job_uuid": model.source_job_uuid,
                "score_weights": spec.score_weights,
                "base_model": model.base_model,
                "status": state.status,
                "replicas": state.running_replicas,
                **spec.option_values(),
            }
        )


def build_model_service(
    *,
    database: Database,
    deployer: ServeDeployer,
    file_models: Iterable[ModelSpec],
    model_roots: ModelRoots,
    storage: Storage | None = None,
    quota: TenantQuota | None = None,
    engine_factory: EngineFactory | None = None,
    registration_defaults: ReplicaOptions | None = None,
) -> ModelService:
    """A ModelService with its resolver and directory sandbox built from the file models
    and the model roots (and the artifacts' `storage`, when it is object storage)."""
    file_models = builtins.list(file_models)
    return ModelService(
        database=database,
        deployer=deployer,
        resolver=ModelResolver(database=database, deployer=deployer, file_models=file_models),
        dirs=ModelDirs(roots=model_roots, file_models=file_models, storage=storage),
        quota=quota,
        engine_factory=engine_factory,
        registration_defaults=registration_defaults,
    )


def _rescaled(spec: ModelSpec, min_replicas: int | None, max_replicas: int | None) -> ModelSpec:
    """`spec` with new replica bounds (None keeps a bound); InvalidRequest for bounds that
    do not hold. An initial count outside the new bounds no longer applies."""
    new_min = spec.min_replicas if min_replicas is None else min_replicas
    new_max = spec.max_replicas if max_replicas is None else max_replicas
    if not (0 <= new_min <= new_max <= MAX_REPLICAS and new_max >= 1):
        raise InvalidRequest(
            f"replica bounds must satisfy 0 <= min_replicas <= max_replicas <= "
            f"{MAX_REPLICAS} and max_replicas >= 1 (got min {new_min}, max {new_max})"
        )
    initial = spec.initial_replicas
    if initial is not None and not new_min <= initial <= new_max:
        initial = None
    options = spec.replica_options.model_copy(
        update={"min_replicas": new_min, "max_replicas": new_max, "initial_replicas": initial}
    )
    return spec.with_options(options)


def _location_key(location: Path | str) -> str:
    """A checkpoint location as compared between a base and an adapter's registration."""
    return str(location.resolve()) if isinstance(location, Path) else location


def _rides_on_message(model: ResolvedModel) -> str:
    base = model.base_model or ""
    who = (
        "an operator scales it, for every tenant"
        if model.app_name == file_app_name(base)
        else "your own model; scale it instead"
    )
    return (
        f"model {model.name!r} is an adapter riding on the replicas of the base model "
        f"{base!r}, which serve every adapter over it: it has no replicas of its own to "
        f"scale; scale {base!r} ({who})"
    )


def _check_spec(model: RegisteredModel) -> None:
    """InvalidRequest for a registration no spec can be made of (score_weights on an LLM,
    a reward model with an adapter), or a local reward checkpoint whose head's labels
    (its config.json, read as JSON) do not fit the weights. A checkpoint in object
    storage is checked by its replica, at deploy."""
    try:
        spec = spec_of(model)
    except ValidationError as exc:
        raise InvalidRequest(_problems(exc)) from None
    if spec.kind != "reward" or not isinstance(spec.checkpoint_dir, Path):
        return
    try:
        config = json.loads((spec.checkpoint_dir / "config.json").read_text())
        label_weights(config_labels(config), spec.score_weights)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise InvalidRequest(f"checkpoint_dir: {exc}") from None


def _same_or_conflict(stored: RegisteredModel, wanted: RegisteredModel) -> None:
    registered, requested = stored.what_was_asked(), wanted.what_was_asked()
    differences = [
        f"{field} (registered {registered[field]!r}, requested {value!r})"
        for field, value in requested.items()
        if registered[field] != value
    ]
    if differences:
        hint = ""
        if any(d.startswith(("min_replicas", "max_replicas")) for d in differences):
            hint = "; replica bounds change through /models/scale"
        raise Conflict(
            f"model {stored.name!r} is already registered with a different "
            f"{', '.join(differences)}{hint}"
        )


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or 'options'}: {err['msg']}"
        for err in exc.errors()
    )
