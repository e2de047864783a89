"""`corral serve`: upgrade the database, start or join Ray, start the models, serve the
API on a host and port or on an inherited socket (`--fd`)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from corral.cli.output import CliError
from corral.cli.state import settings_of

if TYPE_CHECKING:
    from corral.config import Settings

log = logging.getLogger("corral")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8321


@dataclass(frozen=True)
class ServeArgs:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # An inherited, bound TCP socket to serve on instead of host and port.
    fd: int | None = None


def serve(
    ctx: typer.Context,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    fd: Annotated[
        int | None,
        typer.Option(help="serve on this inherited, bound TCP socket instead of --host/--port"),
    ] = None,
) -> None:
    """Upgrade the database, start or join Ray, serve."""
    cmd_serve(settings_of(ctx), ServeArgs(host=host, port=port, fd=fd))


def is_loopback_host(host: str) -> bool:
    """Whether every address `host` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses
    )


def internal_url_for(host: str, port: int) -> str:
    """Where jobs reach this server's internal routes when `CORRAL_INTERNAL_URL` is unset:
    the address it listens on, loopback for a wildcard address (a job on another node
    needs CORRAL_INTERNAL_URL: docs/job_credentials.md)."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):  # noqa: S104 - read, not bound
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# The command imports what it needs when it runs: `corral --help` should not wait for
# Ray, torch and transformers to load.


def cmd_serve(settings: Settings, args: ServeArgs) -> None:
    import ray
    import uvicorn
    from ray import serve

    from corral.agents.shields import ShieldBuilder
    from corral.agents.tools import build_tools
    from corral.app import create_app
    from corral.demo_guards import build_demo_llama_guard, build_demo_prompt_guard
    from corral.demo_model import build_demo_model
    from corral.demo_reward import build_demo_reward_model
    from corral.job_tokens import JobTokens
    from corral.milvus_server import LocalMilvus, MilvusServerError
    from corral.observability.logs import configure_logging
    from corral.ray_cluster import RayHead, connect
    from corral.ray_jobs import RayJobLauncher, jobs_api_url
    from corral.services.models import TenantQuota, build_model_service
    from corral.serving.catalog import (
        ModelsFileError,
        demo_llama_guard_dir,
        demo_prompt_guard_dir,
        load_catalog,
        model_roots,
    )
    from corral.serving.deployer import ModelDeployError, ServeDeployer
    from corral.storage import Storage
    from corral.store import migrate
    from corral.store.db import Database
    from corral.vector_index import build_vector_index

    # Every line of this process in one format (CORRAL_LOG_FORMAT), uvicorn's included:
    # it gets no logging config of its own below, and no access log (the API writes one
    # line per request, `corral.access`, with its id, route template and status).
    configure_logging(settings.log_format)
    # An inherited socket (--fd) was bound by the parent, which chose its port: no
    # port is picked, released and re-bound, so no other process can take it between.
    listener = socket.socket(fileno=args.fd) if args.fd is not None else None
    if listener is not None:
        listener.set_inheritable(False)  # not into the Ray head this may start
    host = str(listener.getsockname()[0]) if listener is not None else args.host
    port = int(listener.getsockname()[1]) if listener is not None else args.port
    if not settings.bearer_keys and not is_loopback_host(host):
        raise CliError(
            f"refusing to serve on {host} without API keys: set CORRAL_API_KEYS "
            "(e.g. 'mytenant:SECRET') or bind a loopback address"
        )
    try:  # a bad models file fails before anything starts
        catalog = load_catalog(settings)
    except ModelsFileError as exc:
        raise CliError(str(exc)) from None
    settings.home.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    ray_target = connect(address=settings.ray_address, home=settings.home)
    log.info("connected to Ray at %s", ray_target)
    if not settings.milvus_uri:  # the embedded Milvus Lite server, beside the Ray head
        try:
            log.info("Milvus Lite at %s", LocalMilvus(settings.home).ensure())
        except MilvusServerError as exc:
            raise CliError(f"the embedded Milvus did not start: {exc}") from None
    # No Serve HTTP proxy: the API reaches every model through Serve handles.
    serve.start(proxy_location="Disabled")
    database = Database(settings.resolved_database_url)
    storage = Storage.from_settings(settings)
    models = build_model_service(
        database=database,
        deployer=ServeDeployer(
            storage=storage.options,
            model_cache_dir=settings.model_cache_dir,
            vllm_python=settings.vllm_python,
        ),
        file_models=catalog.models,
        model_roots=model_roots(settings),
        storage=storage,
        quota=TenantQuota.from_settings(settings),
    )
    if catalog.demo_model_dir is not None:  # the embedded default serves the demo models
        build_demo_model(catalog.demo_model_dir)
        if catalog.demo_reward_dir is not None:
            build_demo_reward_model(catalog.demo_reward_dir, policy_dir=catalog.demo_model_dir)
        build_demo_llama_guard(demo_llama_guard_dir(settings.home))
        build_demo_prompt_guard(demo_prompt_guard_dir(settings.home))
    try:
        models.start()
    except ModelDeployError as exc:
        raise CliError(f"models did not start: {exc}") from None
    job_tokens = JobTokens.from_settings(settings)  # the launcher's and the app's
    launcher = RayJobLauncher(
        jobs_api_url(
            address=settings.ray_address,
            dashboard_url=settings.ray_jobs_url
            or (ray_target.dashboard_url if isinstance(ray_target, RayHead) else None),
        ),
        internal_url=settings.internal_url or internal_url_for(host, port),
        tokens=job_tokens,
    )
    app = create_app(
        settings,
        database=database,
        models=models,
        launcher=launcher,
        cluster_resources=ray.cluster_resources,
        available_resources=ray.available_resources,
        vector_index=build_vector_index(settings),
        tools=build_tools(settings),
        shields=ShieldBuilder(settings, models.resolver, embedded_default=catalog.embedded_default),
        job_tokens=job_tokens,
    )
    try:
        if listener is not None:
            uvicorn.Server(
                uvicorn.Config(app, log_level="info", log_config=None, access_log=False)
            ).run(sockets=[listener])
        else:
            uvicorn.run(
                app,
                host=args.host,
                port=args.port,
                log_level="info",
                log_config=None,
                access_log=False,
            )
    finally:
        database.dispose()
