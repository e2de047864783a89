"""Which models a tenant can use, and where each one runs.

File models (the models file, or the embedded default) are shared by every tenant and
start with the server. Registered models belong to one tenant; their `served_models` row
is the truth, and `restore` (part of `start`) deploys every row again, so a restarted API
server serves them again (and, Serve's code version being unchanged, keeps the replicas
that are still running).

Registration stores the row first, so two concurrent registrations of one name meet at
the primary key, then deploys and waits for the app to run. If the deploy fails, the row
and the app are both removed and the caller gets the reason: nothing stays half
registered, and the same request may simply be sent again.

A tenant may register a name a file model also answers to: for that tenant, its own model
wins. File models are shared, so only an operator scales them; the new bounds are stored
(`file_model_scales`) and win over the models file's from then on, in every API process
and at every start-up, until the next scale. Nobody deletes a file model through the
API: the models file is the truth for which shared models exist.

Mutations (start, register, scale, unregister) take one lock: they are rare, and a deploy
waiting for its app must not race a scale or delete of the same app. Reads do not.
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ray.serve.handle import DeploymentHandle
from sqlalchemy import Delete, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.api.models import ModelInfo, RegisterModelRequest
from corral.demo_model import build_demo_model
from corral.errors import Conflict, Forbidden, InvalidRequest, NotFound
from corral.serving.catalog import (
    MAX_REPLICAS,
    ModelRoots,
    ModelSpec,
    ServedName,
    file_app_name,
    tenant_app_name,
)
from corral.serving.deployer import AppState, ModelDeployError, ServeDeployer
from corral.store.db import Database
from corral.store.jobs import JobStore
from corral.store.tables import FileModelScale, ServedModel, utcnow
from corral.tenancy import tenant_dir
from serve_apps.llm import EngineFactory

log = logging.getLogger(__name__)

Source = Literal["file", "registered"]
# `served_models` has no column for CPUs per replica (nor device, dtype, queue bound):
# registered models get this and ModelSpec's defaults.
REGISTERED_CPUS_PER_REPLICA = 0.5
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


class ModelRegistry:
    def __init__(
        self,
        *,
        database: Database,
        deployer: ServeDeployer,
        file_models: builtins.list[ModelSpec],
        model_roots: ModelRoots,
        engine_factory: EngineFactory | None = None,
        demo_model_dir: Path | None = None,
        registered_cpus_per_replica: float = REGISTERED_CPUS_PER_REPLICA,
    ) -> None:
        """`demo_model_dir`: build the demo model there before the file models deploy
        (the embedded default). `model_roots`: where registered directories may be (see
        `checked_dir`); a shared root may not overlap the tenant-partitioned checkpoints
        directory, or one tenant's checkpoints would be everyone's."""
        self._db = database
        self._deployer = deployer
        # As the models file says; stored scales are applied on top (`_file_specs`).
        self._file_models = {spec.name: spec for spec in file_models}
        self._file_names = {name: spec.name for spec in file_models for name in spec.names}
        self._shared_roots = _both_forms(model_roots.shared)
        self._checkpoints = model_roots.checkpoints
        if self._checkpoints is not None:
            checkpoints = self._checkpoints.expanduser().resolve()
            for root in self._shared_roots:
                if root.is_relative_to(checkpoints) or checkpoints.is_relative_to(root):
                    raise ValueError(
                        f"shared model root {root} overlaps the checkpoints directory "
                        f"{checkpoints}, which is partitioned by tenant"
                    )
        self._shared_dirs = _both_forms(
            [spec.checkpoint_dir for spec in file_models]
            + [spec.adapter_dir for spec in file_models if spec.adapter_dir is not None]
        )
        self._engine_factory = engine_factory
        self._demo_model_dir = demo_model_dir
        self._registered_cpus = registered_cpus_per_replica
        self._lock = threading.RLock()
        # (tenant, name) -> (when read, the registered model or None); see `resolve`.
        self._recent: dict[tuple[str, str], tuple[float, ResolvedModel | None]] = {}

    # ------------------------------------------------------------------ start-up

    def start(self) -> None:
        """Deploy every file model (building the demo model first when asked) and restore
        the registered ones. A file model that does not start is an error; a registered
        model that does not start is logged and listed with its status."""
        with self._lock:
            if self._demo_model_dir is not None:
                build_demo_model(self._demo_model_dir)
            with self._db.transaction() as session:
                specs = self._file_specs(session)
            for spec in specs.values():
                if not (spec.checkpoint_dir / "config.json").is_file():
                    raise ModelDeployError(
                        f"model {spec.name!r}: no checkpoint (config.json) in {spec.checkpoint_dir}"
                    )
                in_file = self._file_models[spec.name]
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
            names = [file_app_name(name) for name in self._file_models]
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
            rows = builtins.list(session.scalars(select(ServedModel)))
        app_names = []
        for row in rows:
            app_name = tenant_app_name(row.tenant, row.name)
            self._deploy(self._spec_of(row), app_name, blocking=False)
            app_names.append(app_name)
        return app_names

    # ------------------------------------------------------------------ lookups

    def resolve(self, *, tenant: str, model: str, fresh: bool = False) -> ResolvedModel:
        """A model by name or alias: the tenant's registered models first, then the file
        models. NotFound for anything else.

        Inference resolves on every request, so what the database says about a (tenant,
        name) is kept for RESOLVE_CACHE_S; this process's own changes update it at once,
        another API process's show up within that time. `fresh` reads the database."""
        registered = self._registered(tenant, model, fresh=fresh)
        if registered is not None:
            return registered
        name = self._file_names.get(model)
        if name is None:
            raise NotFound(f"no model {model[:200]!r}")
        return self._resolved_file(name)

    def _registered(self, tenant: str, model: str, *, fresh: bool) -> ResolvedModel | None:
        key = (tenant, model)
        now = time.monotonic()
        cached = self._recent.get(key)
        if cached is not None and not fresh and now - cached[0] < RESOLVE_CACHE_S:
            return cached[1]
        with self._db.transaction() as session:
            row = session.get(ServedModel, key)
            found = self._resolved_row(row) if row is not None else None
        if len(self._recent) >= RESOLVE_CACHE_ENTRIES:
            self._recent.clear()  # names come from requests: keep the memory bounded
        self._recent[key] = (now, found)
        return found

    def _forget_cached(self, tenant: str, model: str) -> None:
        self._recent.pop((tenant, model), None)

    def handle_for(self, *, tenant: str, model: str) -> DeploymentHandle[Any]:
        """The Serve handle of the app answering for `model` (the inference service's
        entry point). NotFound for an unknown model, ModelUnavailable (503) when its app
        is not deployed."""
        return self._deployer.handle(self.resolve(tenant=tenant, model=model).app_name)

    # ------------------------------------------------------------------ changes

    def register(self, *, tenant: str, request: RegisterModelRequest) -> ModelInfo:
        """Serve a checkpoint (or adapter) for one tenant. The same request again is a
        no-op; another request under a registered name is a Conflict."""
        checkpoint_dir = self.checked_dir(
            request.checkpoint_dir, "checkpoint_dir", "config.json", tenant=tenant
        )
        adapter_dir = (
            self.checked_dir(
                request.adapter_dir, "adapter_dir", "adapter_config.json", tenant=tenant
            )
            if request.adapter_dir is not None
            else None
        )
        # What can be told before deploying is the client's fault (422); a deploy that
        # fails after this is the server's condition (ModelDeployError, 503).
        readable_config(checkpoint_dir / "config.json", "checkpoint_dir")
        if adapter_dir is not None:
            readable_config(adapter_dir / "adapter_config.json", "adapter_dir")
        wanted = {
            "checkpoint_dir": str(checkpoint_dir),
            "adapter_dir": str(adapter_dir) if adapter_dir is not None else None,
            "engine": request.engine,
            "gpus_per_replica": request.gpus_per_replica,
            "min_replicas": request.min_replicas,
            "max_replicas": request.max_replicas,
            "target_ongoing_requests": request.target_ongoing_requests,
            "max_batch_size": request.max_batch_size,
            "source_job_uuid": request.source_job_uuid,
        }
        with self._lock:
            try:
                with self._db.transaction() as session:
                    existing = session.get(ServedModel, (tenant, request.name))
                    if existing is not None:
                        _same_or_conflict(existing, wanted)
                        return self._info(self._resolved_row(existing), self._state_of(existing))
                    if request.source_job_uuid is not None:
                        try:
                            JobStore(session).get(request.source_job_uuid, tenant=tenant)
                        except NotFound:
                            raise InvalidRequest(
                                f"no job {request.source_job_uuid[:200]!r}"
                            ) from None
                    now = utcnow()
                    row = ServedModel(
                        tenant=tenant, name=request.name, created_at=now, updated_at=now, **wanted
                    )
                    session.add(row)
            except IntegrityError:
                # A concurrent registration of the same name committed first.
                with self._db.transaction() as session:
                    existing = session.get(ServedModel, (tenant, request.name))
                    if existing is None:
                        raise
                    _same_or_conflict(existing, wanted)
                    return self._info(self._resolved_row(existing), self._state_of(existing))

            resolved = self._resolved_row(row)
            self._forget_cached(tenant, request.name)
            try:
                self._deploy(resolved.spec, resolved.app_name, blocking=True)
            except BaseException:
                self._forget(tenant, request.name, resolved.app_name)
                raise
            return self._info(resolved, self._deployer.status(resolved.app_name))

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
        otherwise), for every tenant, and its new bounds are stored."""
        if replicas is not None:
            if min_replicas is not None or max_replicas is not None:
                raise InvalidRequest("give either replicas or min_replicas/max_replicas")
            min_replicas = max_replicas = replicas
        if min_replicas is None and max_replicas is None:
            raise InvalidRequest("give replicas, min_replicas or max_replicas")
        with self._lock:
            resolved = self.resolve(tenant=tenant, model=model, fresh=True)
            if resolved.source == "file":
                if not operator:
                    raise Forbidden(
                        f"model {resolved.name!r} is shared by every tenant (from the models "
                        "file): only an operator key scales it"
                    )
                with self._db.transaction() as session:
                    resolved = replace(resolved, spec=self._file_specs(session)[resolved.name])
            new_min = resolved.spec.min_replicas if min_replicas is None else min_replicas
            new_max = resolved.spec.max_replicas if max_replicas is None else max_replicas
            if not (0 <= new_min <= new_max <= MAX_REPLICAS and new_max >= 1):
                raise InvalidRequest(
                    f"replica bounds must satisfy 0 <= min_replicas <= max_replicas <= "
                    f"{MAX_REPLICAS} and max_replicas >= 1 (got min {new_min}, max {new_max})"
                )
            spec = resolved.spec.model_copy(
                update={"min_replicas": new_min, "max_replicas": new_max}
            )
            if resolved.source == "file":
                self._store_file_scale(resolved.app_name, spec, scaled_by=tenant)
            else:
                with self._db.transaction() as session:
                    row = session.get(ServedModel, (tenant, resolved.name))
                    if row is None:
                        raise NotFound(f"no model {model!r}")
                    row.min_replicas, row.max_replicas = new_min, new_max
                    row.updated_at = utcnow()
                    session.flush()
                    # Inside the transaction: if Serve refuses, the row keeps its bounds.
                    self._deployer.scale(
                        resolved.app_name, spec, engine_factory=self._engine_factory
                    )
            updated = replace(resolved, spec=spec)
            self._forget_cached(tenant, resolved.name)
            return self._info(updated, self._deployer.status(resolved.app_name))

    def unregister(self, *, tenant: str, model: str, operator: bool = False) -> None:
        """Stop serving a tenant's registered model and forget it. The app goes first: if
        Serve cannot delete it, the row stays and the model is still registered. A file
        model is Forbidden to a tenant; an operator is told to edit the models file."""
        with self._lock:
            with self._db.transaction() as session:
                row = session.get(ServedModel, (tenant, model))
            if row is None:
                if model in self._file_names and not operator:
                    raise Forbidden(
                        f"model {model!r} is shared by every tenant (from the models file): "
                        "only an operator manages it"
                    )
                if model in self._file_names:
                    raise InvalidRequest(
                        f"model {model!r} comes from the models file: remove it there and "
                        "restart the server (to free its replicas now, scale it to "
                        "min_replicas 0)"
                    )
                raise NotFound(f"no model {model[:200]!r}")
            self._deployer.delete(tenant_app_name(tenant, row.name))
            with self._db.transaction() as session:
                session.execute(_delete_row(tenant, row.name))
            self._forget_cached(tenant, row.name)

    # ------------------------------------------------------------------ listing

    def list(self, tenant: str, *, all_tenants: bool = False) -> builtins.list[ModelInfo]:
        """The file models (with their stored bounds), then the tenant's registered models
        (every tenant's with `all_tenants`, the operators' view), with their replicas."""
        states = self._deployer.statuses()
        query = select(ServedModel).order_by(ServedModel.tenant, ServedModel.name)
        if not all_tenants:
            query = query.where(ServedModel.tenant == tenant)
        with self._db.transaction() as session:
            rows = builtins.list(session.scalars(query))
            files = self._file_specs(session)
        resolved = [
            ResolvedModel(name, file_app_name(name), spec, "file") for name, spec in files.items()
        ] + [self._resolved_row(row) for row in rows]
        return [self._info(model, states.get(model.app_name)) for model in resolved]

    def model_names(self, *, tenant: str) -> builtins.list[ServedName]:
        """Every name that resolves for `tenant`, once each: the file models under their
        names and aliases, then the tenant's registered models. A registered name that
        shadows a file model's name is listed once, as the tenant's."""
        with self._db.transaction() as session:
            registered = builtins.list(
                session.scalars(
                    select(ServedModel.name)
                    .where(ServedModel.tenant == tenant)
                    .order_by(ServedModel.name)
                )
            )
        shadowed = set(registered)
        shared = [
            ServedName(name=name, owner=None)
            for spec in self._file_models.values()
            for name in spec.names
            if name not in shadowed
        ]
        return shared + [ServedName(name=name, owner=tenant) for name in registered]

    # ------------------------------------------------------------------ helpers

    def _forget(self, tenant: str, name: str, app_name: str) -> None:
        """Undo a registration whose deploy failed: the app (if Serve still answers), then
        the row, so no half-registered model stays behind."""
        try:
            self._deployer.delete(app_name)
        except Exception:
            log.exception("could not delete the Serve app %s of a failed registration", app_name)
        with self._db.transaction() as session:
            session.execute(_delete_row(tenant, name))
        self._forget_cached(tenant, name)

    def _deploy(self, spec: ModelSpec, app_name: str, *, blocking: bool) -> None:
        self._deployer.deploy(
            spec, app_name=app_name, engine_factory=self._engine_factory, blocking=blocking
        )

    def _resolved_file(self, name: str) -> ResolvedModel:
        return ResolvedModel(name, file_app_name(name), self._file_models[name], "file")

    def _file_specs(self, session: Session) -> dict[str, ModelSpec]:
        """The file models with the replica bounds an operator stored for them."""
        specs = dict(self._file_models)
        for scale in session.scalars(select(FileModelScale)):
            spec = specs.get(scale.name)
            if spec is not None:  # a model since removed from the file: nothing to apply
                specs[scale.name] = spec.model_copy(
                    update={"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas}
                )
        return specs

    def _store_file_scale(self, app_name: str, spec: ModelSpec, *, scaled_by: str) -> None:
        """Store a file model's new bounds and apply them, in one transaction: if Serve
        refuses, nothing is stored. Another API process storing the first row for the
        same model at the same time makes the insert fail once; the second try updates."""
        for attempt in range(2):
            try:
                with self._db.transaction() as session:
                    row = session.get(FileModelScale, spec.name)
                    if row is None:
                        row = FileModelScale(name=spec.name)
                        session.add(row)
                    row.min_replicas, row.max_replicas = spec.min_replicas, spec.max_replicas
                    row.scaled_by, row.updated_at = scaled_by, utcnow()
                    session.flush()
                    self._deployer.scale(app_name, spec, engine_factory=self._engine_factory)
                return
            except IntegrityError:
                if attempt == 1:
                    raise

    def _spec_of(self, row: ServedModel) -> ModelSpec:
        return ModelSpec(
            name=row.name,
            checkpoint_dir=Path(row.checkpoint_dir),
            adapter_dir=Path(row.adapter_dir) if row.adapter_dir is not None else None,
            engine="transformers",
            gpus_per_replica=row.gpus_per_replica,
            cpus_per_replica=self._registered_cpus,
            min_replicas=row.min_replicas,
            max_replicas=row.max_replicas,
            target_ongoing_requests=row.target_ongoing_requests,
            max_batch_size=row.max_batch_size,
        )

    def _resolved_row(self, row: ServedModel) -> ResolvedModel:
        return ResolvedModel(
            name=row.name,
            app_name=tenant_app_name(row.tenant, row.name),
            spec=self._spec_of(row),
            source="registered",
            source_job_uuid=row.source_job_uuid,
            tenant=row.tenant,
        )

    def _state_of(self, row: ServedModel) -> AppState:
        return self._deployer.status(tenant_app_name(row.tenant, row.name))

    def _info(self, model: ResolvedModel, state: AppState | None) -> ModelInfo:
        spec = model.spec
        return ModelInfo(
            name=model.name,
            tenant=model.tenant,
            aliases=builtins.list(spec.aliases),
            source=model.source,
            checkpoint_dir=str(spec.checkpoint_dir),
            adapter_dir=str(spec.adapter_dir) if spec.adapter_dir is not None else None,
            engine=spec.engine,
            gpus_per_replica=spec.gpus_per_replica,
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            target_ongoing_requests=spec.target_ongoing_requests,
            max_batch_size=spec.max_batch_size,
            source_job_uuid=model.source_job_uuid,
            status=state.status if state is not None else "NOT_STARTED",
            replicas=state.running_replicas if state is not None else 0,
        )

    def checked_dir(self, value: str, field: str, required_file: str, *, tenant: str) -> Path:
        """An absolute directory that holds `required_file` and that `tenant` may use:
        under a shared model root, one of the models file's own directories, or inside
        the tenant's own part of the checkpoints directory (its jobs' checkpoints).
        InvalidRequest otherwise.

        The path must qualify both as written and after resolving links, and it is judged
        as written before the file system is asked anything: a path into another tenant's
        directory, or a link from the tenant's own directory into another's, is refused
        with the same answer whether or not anything is there."""
        raw = Path(value)
        if not raw.is_absolute() or ".." in raw.parts:
            raise InvalidRequest(f"{field} must be an absolute path without '..'")
        allowed_roots = (*self._shared_roots, *self._own_roots(tenant))
        if not _admitted(raw, allowed_roots, self._shared_dirs):
            raise InvalidRequest(self._refusal(field, tenant))
        try:
            resolved = raw.resolve()
        except (OSError, RuntimeError):
            raise InvalidRequest(f"{field}: cannot resolve {value[:300]!r}") from None
        if not _admitted(resolved, allowed_roots, self._shared_dirs):
            raise InvalidRequest(self._refusal(field, tenant))
        if not resolved.exists():
            raise InvalidRequest(f"{field}: no such directory {value[:300]!r}")
        if not resolved.is_dir():
            raise InvalidRequest(f"{field}: {value[:300]!r} is not a directory")
        if not (resolved / required_file).is_file():
            raise InvalidRequest(f"{field}: no {required_file} in {value[:300]!r}")
        return resolved

    def _own_roots(self, tenant: str) -> tuple[Path, ...]:
        """The tenant's own part of the checkpoints directory (where `job_checkpoint_dir`
        puts its jobs' checkpoints), as configured and resolved (the tenant's directory
        may itself be a link the operator made)."""
        if self._checkpoints is None:
            return ()
        return _both_forms([tenant_dir(self._checkpoints, tenant)])

    def _refusal(self, field: str, tenant: str) -> str:
        places = [f"under {root}" for root in dict.fromkeys(self._shared_roots)]
        if self._checkpoints is not None:
            own = tenant_dir(self._checkpoints, tenant)
            places.insert(0, f"a checkpoint of one of your own jobs (under {own})")
        places.append("a directory the models file names")
        return f"{field} must be {', '.join(places[:-1])} or {places[-1]}"


def _both_forms(paths: Iterable[Path]) -> tuple[Path, ...]:
    """Each path as configured (made absolute) and with its links resolved: a path is
    judged as written and as resolved, and a root may be written either way."""
    forms: dict[Path, None] = {}
    for path in paths:
        absolute = path.expanduser().absolute()
        forms[absolute] = None
        forms[absolute.resolve()] = None
    return tuple(forms)


def _admitted(path: Path, roots: tuple[Path, ...], exact: tuple[Path, ...]) -> bool:
    return path in exact or any(path.is_relative_to(root) for root in roots)


def readable_config(path: Path, field: str, limit: int = 1 << 20) -> None:
    """A checkpoint's config file must be a JSON object of sane size: one that is not
    could never load, and saying so now beats a replica failing to start."""
    try:
        too_big = path.stat().st_size > limit
        config = None if too_big else json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise InvalidRequest(f"{field}: {path.name} is not a readable JSON object")


def _delete_row(tenant: str, name: str) -> Delete:
    return delete(ServedModel).where(ServedModel.tenant == tenant, ServedModel.name == name)


def _same_or_conflict(row: ServedModel, wanted: dict[str, Any]) -> None:
    differences = [
        f"{field} (registered {getattr(row, field)!r}, requested {value!r})"
        for field, value in wanted.items()
        if getattr(row, field) != value
    ]
    if differences:
        hint = ""
        if any(d.startswith(("min_replicas", "max_replicas")) for d in differences):
            hint = "; replica bounds change through /models/scale"
        raise Conflict(
            f"model {row.name!r} is already registered with a different "
            f"{', '.join(differences)}{hint}"
        )
