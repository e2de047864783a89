"""Ray Serve, as Corral uses it: one app per model, deployed, scaled in place, watched and
deleted by name. The caller has already connected to Ray and started Serve without an
HTTP proxy (`serve.start(proxy_location="Disabled")`); apps are reached by handles only.

Scaling in place. `serve.run` gives every deployment a fresh random code version, so a
plain redeploy replaces every replica (a rolling restart that reloads the model). The
deployer pins the code version to a digest of everything a replica is built from except
the autoscaling options, so Serve treats a change of bounds as the lightweight update it
is: running replicas keep running (and keep their requests), replicas are only added or
removed. Any other change (weights, engine, batch size, resources) still restarts them.
The same digest makes redeploying an unchanged app a no-op, so an API server that
restarts against a running Ray keeps its replicas.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application, RunTarget
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

import corral
from corral.errors import BackendUnavailable, Overloaded
from corral.serving.catalog import ModelSpec
from corral.serving.kinds import NotServable, check_servable
from serve_apps.model_cache import StorageOptions
from serve_apps.vllm_env import VLLMEnvironmentMissing, vllm_python

# An engine factory injected into every app (tests: a scripted engine), in place of the
# engine each app's config names. Its signature is the app kind's own.
EngineFactory = Callable[..., Any]

# ReplicaOptions fields Serve applies without restarting a replica.
AUTOSCALING_FIELDS = frozenset(
    {
        "min_replicas",
        "max_replicas",
        "initial_replicas",
        "target_ongoing_requests",
        "upscale_delay_s",
        "downscale_delay_s",
        "look_back_period_s",
    }
)
log = logging.getLogger(__name__)

DEFAULT_DEPLOY_TIMEOUT_S = 300.0
STATUS_CACHE_S = 2.0
DEPLOY_RETRY_AFTER_S = 30  # memory or CPUs may free up; a replica start takes seconds
_POLL_S = 0.25


class ModelDeployError(BackendUnavailable):
    """A model's Serve app did not start (Serve's own message included). By then the
    request has passed every check that can be made before deploying (the models service
    refuses a missing or unreadable checkpoint with 422), so what is left is the server's
    condition: a replica out of memory, no free resources, weights that fail to load, a
    start-up past the deadline. Hence 503 with `Retry-After`, not the client's 422."""

    code = "model_deploy_failed"

    def __init__(self, message: str, *, retry_after_s: int = DEPLOY_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelUnavailable(Overloaded):
    """A known model has no running Serve app right now (starting, failed, or lost)."""

    code = "model_unavailable"


@dataclass(frozen=True)
class AppState:
    """A Serve app as Serve reports it; `NOT_STARTED` when there is no such app."""

    status: str
    message: str
    running_replicas: int

    @property
    def is_running(self) -> bool:
        return self.status == "RUNNING"


NOT_STARTED = AppState(status="NOT_STARTED", message="", running_replicas=0)


class ServeDeployer:
    """Builds each model's app through the kind table (`corral.serving.kinds`)."""

    def __init__(
        self,
        *,
        engine_factory: EngineFactory | None = None,
        deploy_timeout_s: float = DEFAULT_DEPLOY_TIMEOUT_S,
        storage: StorageOptions | None = None,
        model_cache_dir: Path | None = None,
        vllm_python: Path | None = None,
    ) -> None:
        """`storage` and `model_cache_dir`: how replicas reach a model in object storage
        and where on their node they keep it (serve_apps.model_cache). `vllm_python`:
        the env `engine: vllm` replicas run in (None: serve_apps.vllm_env's default)."""
        self._vllm_python = vllm_python
        self._engine_factory = engine_factory
        self._deploy_timeout_s = deploy_timeout_s
        self._storage = storage or StorageOptions()
        self._model_cache_dir = model_cache_dir
        self._handles: dict[str, DeploymentHandle[Any]] = {}
        self._handles_lock = threading.Lock()
        self._statuses: dict[str, AppState] = {}
        self._statuses_at = -math.inf
        self._refreshing = False  # a background refresh of _statuses is under way

    def deploy(
        self,
        spec: ModelSpec,
        *,
        app_name: str,
        engine_factory: EngineFactory | None = None,
        blocking: bool = True,
        timeout_s: float | None = None,
    ) -> None:
        """Create or update the app `app_name` for `spec`. With `blocking`, wait until it
        is RUNNING: ModelDeployError if Serve gives up on it or the wait times out."""
        factory = engine_factory or self._engine_factory
        build_app = check_servable(spec.kind, spec.engine).build_app
        config = spec.app_config(app_name=app_name)
        if spec.engine == "vllm":
            try:
                self.check_engine(spec.engine)
            except NotServable as exc:
                raise ModelDeployError(f"model app {app_name!r}: {exc}") from None
            config["vllm_python"] = str(vllm_python(self._vllm_python))
        if (
            isinstance(spec.checkpoint_dir, str)
            or isinstance(spec.adapter_dir, str)
            or spec.max_adapters > 0  # adapters riding on it may be in object storage
        ):
            # Only then: a local model's config (and so its code version) stays as it was.
            config["storage"] = self._storage.model_dump()
            config["model_cache_dir"] = self._model_cache_dir
        app = _with_code_version(
            build_app(config, engine_factory=factory), config, spec.kind, factory
        )
        serve.run_many(
            [RunTarget(target=app, name=app_name, route_prefix=None)],
            wait_for_applications_running=False,
        )
        with self._handles_lock:
            self._statuses_at = -math.inf  # its old state (e.g. failed) no longer holds
        if blocking:
            self.wait_running(app_name, timeout_s=timeout_s)

    def check_engine(self, engine: str) -> None:
        """NotServable when `engine` needs an environment this deployer lacks: vLLM runs
        in its own (serve_apps.vllm_env), which must exist before a model names it."""
        if engine == "vllm":
            try:
                vllm_python(self._vllm_python)
            except VLLMEnvironmentMissing as exc:
                raise NotServable(str(exc)) from None

    def scale(
        self,
        app_name: str,
        spec: ModelSpec,
        *,
        engine_factory: EngineFactory | None = None,
        blocking: bool = False,
    ) -> None:
        """Apply `spec`'s replica bounds to a running app in place (see the module
        docstring): nothing restarts, requests in flight finish."""
        if self.status(app_name).status in ("NOT_STARTED", "DELETING"):
            raise ModelUnavailable(f"model app {app_name!r} is not deployed")
        self.deploy(spec, app_name=app_name, engine_factory=engine_factory, blocking=blocking)

    def wait_running(self, app_name: str, *, timeout_s: float | None = None) -> None:
        limit = self._deploy_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while True:
            state = self.status(app_name)
            if state.is_running:
                return
            if state.status == "DEPLOY_FAILED":
                log.warning("model app %s failed to start: %s", app_name, state.message)
                raise ModelDeployError(
                    f"model app {app_name!r} failed to start: {_summary(state.message)}"
                )
            if state.status == "NOT_STARTED":
                raise ModelDeployError(f"model app {app_name!r} disappeared while starting")
            if time.monotonic() > deadline:
                raise ModelDeployError(
                    f"model app {app_name!r} is not running after {limit:g} s "
                    f"({state.status}): {_summary(state.message)}"
                )
            time.sleep(_POLL_S)

    def wait_all(
        self, app_names: Iterable[str], *, timeout_s: float | None = None
    ) -> dict[str, ModelDeployError | None]:
        """Wait for several apps at once; each name maps to its error, or None."""
        limit = self._deploy_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        outcome: dict[str, ModelDeployError | None] = {}
        for name in app_names:
            try:
                self.wait_running(name, timeout_s=max(0.0, deadline - time.monotonic()))
                outcome[name] = None
            except ModelDeployError as exc:
                outcome[name] = exc
        return outcome

    def status(self, app_name: str) -> AppState:
        return self.statuses().get(app_name, NOT_STARTED)

    def statuses(self) -> dict[str, AppState]:
        """Every Serve app, from one call to the controller. An app's replicas are its
        RUNNING replicas over all its deployments (one, for every kind so far)."""
        states: dict[str, AppState] = {}
        for name, app in serve.status().applications.items():
            # ReplicaState is a str enum that Serve does not export publicly.
            running = sum(
                n
                for deployment in app.deployments.values()
                for state, n in deployment.replica_states.items()
                if state == "RUNNING"
            )
            messages = [app.message] + [d.message for d in app.deployments.values()]
            states[name] = AppState(
                status=ApplicationStatus(app.status).value,
                message="; ".join(m for m in messages if m),
                running_replicas=int(running),
            )
        return states

    def replicas(self, app_name: str) -> int:
        """How many replicas of the app are RUNNING now."""
        return self.status(app_name).running_replicas

    def _recent_failure(self, app_name: str) -> AppState | None:
        """The app's state if Serve gave up on it (DEPLOY_FAILED, or UNHEALTHY with no
        replica running), from Serve's status of at most STATUS_CACHE_S ago: requests
        ask on every call, Serve's controller is asked at most that often. For an app
        last seen running, a stale status is refreshed in the background, so that no
        request waits on the controller (it blocks the event loop for as long as the
        controller takes); for any other, the request waits for the fresh status."""
        now = time.monotonic()
        with self._handles_lock:
            state = self._statuses.get(app_name)
            stale = now - self._statuses_at > STATUS_CACHE_S
            in_background = stale and state is not None and state.is_running
            if in_background and self._refreshing:
                stale = False  # a refresh is under way
            elif in_background:
                self._refreshing = True
        if stale and in_background:
            threading.Thread(target=self._refresh_statuses, name="serve-status").start()
        elif stale:
            self._refresh_statuses()
            with self._handles_lock:
                state = self._statuses.get(app_name)
        if state is None:
            return None
        if state.status == "DEPLOY_FAILED" or (
            state.status == "UNHEALTHY" and state.running_replicas == 0
        ):
            return state
        return None

    def _refresh_statuses(self) -> None:
        try:
            statuses = self.statuses()
        finally:
            with self._handles_lock:
                self._refreshing = False
        with self._handles_lock:
            self._statuses, self._statuses_at = statuses, time.monotonic()

    def delete(self, app_name: str) -> None:
        """Delete the app (waiting for it to go); deleting an absent app does nothing."""
        with self._handles_lock:
            self._handles.pop(app_name, None)
        if self.status(app_name).status != "NOT_STARTED":
            serve.delete(app_name)

    def handle(self, app_name: str) -> DeploymentHandle[Any]:
        """A handle to the app's ingress deployment; ModelUnavailable if there is no such app, or
        if it failed to deploy (a request to it would wait for a replica that never
        comes: Serve raises nothing then). Handles outlive redeploys of the same app,
        so they are kept."""
        failed = self._recent_failure(app_name)
        if failed is not None:
            raise ModelUnavailable(
                f"model app {app_name!r} failed to start: {_summary(failed.message)}",
                retry_after_s=DEPLOY_RETRY_AFTER_S,
            )
        with self._handles_lock:
            cached = self._handles.get(app_name)
        if cached is not None:
            return cached
        try:
            handle: DeploymentHandle[Any] = serve.get_app_handle(app_name)
        except RayServeException:
            raise ModelUnavailable(f"model app {app_name!r} is not deployed") from None
        with self._handles_lock:
            return self._handles.setdefault(app_name, handle)


def _summary(message: str, limit: int = 500) -> str:
    """Serve's messages carry whole tracebacks (logged in full); callers get the last
    line, which names the error."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    last = lines[-1] if lines else "no message from Serve"
    return last if len(last) <= limit else last[:limit] + "..."


def code_version(
    config: dict[str, Any], engine_factory: EngineFactory | None = None, *, kind: str = "llm"
) -> str:
    """What a replica is built from, minus the autoscaling options, as a digest: the app
    kind, its config, and an injected engine factory (None: the engine the config names)."""
    built_from = {key: value for key, value in config.items() if key not in AUTOSCALING_FIELDS}
    text = json.dumps(
        {
            "corral": corral.__version__,
            "kind": kind,
            "config": built_from,
            "engine": _describe_factory(engine_factory) if engine_factory else None,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _describe_factory(factory: Callable[..., Any]) -> str:
    if isinstance(factory, partial):
        return f"{_describe_factory(factory.func)}{factory.args!r}{factory.keywords!r}"
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', factory)}"


def _with_code_version(
    app: Application, config: dict[str, Any], kind: str, factory: EngineFactory | None
) -> Application:
    # Serve sets this itself for config-file deploys (from import_path and args); the
    # imperative API has no public spelling for it, hence `_internal`.
    deployment = app._bound_deployment.options(
        version=code_version(config, factory, kind=kind), _internal=True
    )
    return Application(deployment)
