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
wins. Scaling a file model changes its bounds for every tenant, in memory, until the
server restarts (the models file stays the truth for it).

Mutations (start, register, scale, unregister) take one lock: they are rare, and a deploy
waiting for its app must not race a scale or delete of the same app. Reads do not.
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ray.serve.handle import DeploymentHandle
from sqlalchemy import Delete, delete, select
from sqlalchemy.exc import IntegrityError

from corral.api.models import ModelInfo, RegisterModelRequest
from corral.demo_model import build_demo_model
from corral.errors import Conflict, InvalidRequest, NotFound
from corral.serving.catalog import MAX_REPLICAS, ModelSpec, file_app_name, tenant_app_name
from corral.serving.deployer import AppState, ModelDeployError, ServeDeployer
from corral.store.db import Database
from corral.store.tables import Job, ServedModel, utcnow
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


class ModelRegistry:
    def __init__(
        self,
        *,
        database: Database,
        deployer: ServeDeployer,
        file_models: builtins.list[ModelSpec],
        model_roots: tuple[Path, ...],
        engine_factory: EngineFactory | None = None,
        demo_model_dir: Path | None = None,
        registered_cpus_per_replica: float = REGISTERED_CPUS_PER_REPLICA,
    ) -> None:
        """`demo_model_dir`: build the demo model there before the file models deploy
        (the embedded default). `model_roots`: where registered directories may be."""
        self._db = database
        self._deployer = deployer
        self._file_models = {spec.name: spec for spec in file_models}
        self._file_names = {name: spec.name for spec in file_models for name in spec.names}
        self._roots = tuple(root.expanduser().resolve() for root in model_roots)
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
            for spec in self._file_models.values():
                if not (spec.checkpoint_dir / "config.json").is_file():
                    raise ModelDeployError(
                        f"model {spec.name!r}: no checkpoint (config.json) in {spec.checkpoint_dir}"
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
        checkpoint_dir = self.checked_dir(request.checkpoint_dir, "checkpoint_dir", "config.json")
        adapter_dir = (
            self.checked_dir(request.adapter_dir, "adapter_dir", "adapter_config.json")
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
                        job = session.get(Job, request.source_job_uuid)
                        if job is None or job.tenant != tenant:
                            raise InvalidRequest(f"no job {request.source_job_uuid!r}")
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
    ) -> ModelInfo:
        """Change a model's replica bounds in place; `replicas=N` pins both to N. Returns
        at once: Serve then adds or removes replicas (`list` shows them), and requests in
        flight finish. A file model's bounds change for every tenant until restart."""
        if replicas is not None:
            if min_replicas is not None or max_replicas is not None:
                raise InvalidRequest("give either replicas or min_replicas/max_replicas")
            min_replicas = max_replicas = replicas
        if min_replicas is None and max_replicas is None:
            raise InvalidRequest("give replicas, min_replicas or max_replicas")
        with self._lock:
            resolved = self.resolve(tenant=tenant, model=model, fresh=True)
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
                self._deployer.scale(resolved.app_name, spec, engine_factory=self._engine_factory)
                self._file_models[resolved.name] = spec
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

    def unregister(self, *, tenant: str, model: str) -> None:
        """Stop serving a registered model and forget it. The app goes first: if Serve
        cannot delete it, the row stays and the model is still registered."""
        with self._lock:
            with self._db.transaction() as session:
                row = session.get(ServedModel, (tenant, model))
            if row is None:
                if model in self._file_names:
                    raise InvalidRequest(
                        f"model {model!r} comes from the models file and cannot be deleted here"
                    )
                raise NotFound(f"no model {model[:200]!r}")
            self._deployer.delete(tenant_app_name(tenant, row.name))
            with self._db.transaction() as session:
                session.execute(_delete_row(tenant, row.name))
            self._forget_cached(tenant, row.name)

    # ------------------------------------------------------------------ listing

    def list(self, tenant: str) -> builtins.list[ModelInfo]:
        """The file models, then the tenant's registered models, with their replicas."""
        states = self._deployer.statuses()
        with self._db.transaction() as session:
            rows = builtins.list(
                session.scalars(
                    select(ServedModel)
                    .where(ServedModel.tenant == tenant)
                    .order_by(ServedModel.name)
                )
            )
        resolved = [self._resolved_file(name) for name in self._file_models] + [
            self._resolved_row(row) for row in rows
        ]
        return [self._info(model, states.get(model.app_name)) for model in resolved]

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
        )

    def _state_of(self, row: ServedModel) -> AppState:
        return self._deployer.status(tenant_app_name(row.tenant, row.name))

    def _info(self, model: ResolvedModel, state: AppState | None) -> ModelInfo:
        spec = model.spec
        return ModelInfo(
            name=model.name,
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

    def checked_dir(self, value: str, field: str, required_file: str) -> Path:
        """An absolute directory under one of the model roots (after resolving links and
        `..`) that holds `required_file`; InvalidRequest otherwise."""
        raw = Path(value)
        if not raw.is_absolute() or ".." in raw.parts:
            raise InvalidRequest(f"{field} must be an absolute path without '..'")
        # The roots are checked before existence, so nothing outside them can be probed.
        try:
            resolved = raw.resolve()
        except (OSError, RuntimeError):
            raise InvalidRequest(f"{field}: cannot resolve {value[:300]!r}") from None
        if not any(resolved.is_relative_to(root) for root in self._roots):
            roots = ", ".join(str(root) for root in self._roots)
            raise InvalidRequest(f"{field} must lie under one of the model roots ({roots})")
        if not resolved.exists():
            raise InvalidRequest(f"{field}: no such directory {value[:300]!r}")
        if not resolved.is_dir():
            raise InvalidRequest(f"{field}: {value[:300]!r} is not a directory")
        if not (resolved / required_file).is_file():
            raise InvalidRequest(f"{field}: no {required_file} in {value[:300]!r}")
        return resolved


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
