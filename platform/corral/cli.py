"""The `corral` command: serve the API, manage the database, the embedded Ray head and
the demo model, and run the scripted demo."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from corral.cli_jobs import add_jobs_commands
from corral.cli_models import add_models_commands
from corral.config import Settings

log = logging.getLogger("corral")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8321


class CliError(Exception):
    """A problem to report to the user in one line, with exit status 2."""


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


# Commands import what they need when they run: `corral --help` should not wait for Ray,
# torch and transformers to load.


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    import ray
    import uvicorn
    from ray import serve

    from corral.app import create_app
    from corral.demo_model import build_demo_model
    from corral.ray_cluster import RayHead, connect
    from corral.ray_jobs import RayJobLauncher, jobs_api_url
    from corral.services.models import TenantQuota, build_model_service
    from corral.serving.catalog import ModelsFileError, load_catalog, model_roots
    from corral.serving.deployer import ModelDeployError, ServeDeployer
    from corral.store import migrate
    from corral.store.db import Database

    # An inherited socket (--fd) was bound by the parent, which chose its port: no
    # port is picked, released and re-bound, so no other process can take it between.
    listener = socket.socket(fileno=args.fd) if args.fd is not None else None
    if listener is not None:
        listener.set_inheritable(False)  # not into the Ray head this may start
    host = str(listener.getsockname()[0]) if listener is not None else args.host
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
    # No Serve HTTP proxy: the API reaches every model through Serve handles.
    serve.start(proxy_location="Disabled")
    database = Database(settings.resolved_database_url)
    models = build_model_service(
        database=database,
        deployer=ServeDeployer(),
        file_models=catalog.models,
        model_roots=model_roots(settings),
        quota=TenantQuota.from_settings(settings),
    )
    if catalog.demo_model_dir is not None:  # the embedded default serves the demo model
        build_demo_model(catalog.demo_model_dir)
    try:
        models.start()
    except ModelDeployError as exc:
        raise CliError(f"models did not start: {exc}") from None
    launcher = RayJobLauncher(
        jobs_api_url(
            address=settings.ray_address,
            dashboard_url=settings.ray_jobs_url
            or (ray_target.dashboard_url if isinstance(ray_target, RayHead) else None),
        ),
        database_url=settings.resolved_database_url,
    )
    app = create_app(
        settings,
        database=database,
        models=models,
        launcher=launcher,
        cluster_resources=ray.cluster_resources,
    )
    try:
        if listener is not None:
            uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[listener])
        else:
            uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        database.dispose()


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> None:
    from corral.store import migrate

    migrate.upgrade(settings.resolved_database_url, args.revision)
    print(f"database at revision {migrate.current_revision(settings.resolved_database_url)}")


def cmd_db_current(settings: Settings, _args: argparse.Namespace) -> None:
    from corral.store import migrate

    current = migrate.current_revision(settings.resolved_database_url)
    head = migrate.head_revision()
    print(f"current: {current or '(empty)'}  head: {head}")


def cmd_models_create_demo(_settings: Settings, args: argparse.Namespace) -> None:
    from corral.demo_model import build_demo_model, describe

    directory = build_demo_model(Path(args.directory))
    print(f"demo model ready in {directory}: {describe(directory)}")


def cmd_ray_status(settings: Settings, _args: argparse.Namespace) -> None:
    from corral.ray_cluster import LocalRayHead

    head = LocalRayHead(settings.home).find()
    if head is None:
        print("no embedded Ray head is running")
    else:
        print(f"Ray head pid {head.pid} at {head.address}, dashboard {head.dashboard_url}")


def cmd_ray_stop(settings: Settings, _args: argparse.Namespace) -> None:
    from corral.ray_cluster import LocalRayHead

    stopped = LocalRayHead(settings.home).stop()
    print("stopped the embedded Ray head" if stopped else "no embedded Ray head was running")


def cmd_demo(settings: Settings, args: argparse.Namespace) -> None:
    from corral.demo import DemoFailed, run_demo

    try:
        run_demo(settings, port=args.port, keep_ray=args.keep_ray)
    except DemoFailed as exc:
        raise CliError(f"demo failed: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="upgrade the database, start or join Ray, serve")
    serve.add_argument("--host", default=DEFAULT_HOST)
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument(
        "--fd",
        type=int,
        default=None,
        help="serve on this inherited, bound TCP socket instead of --host/--port",
    )
    serve.set_defaults(handler=cmd_serve)

    db = commands.add_parser("db", help="the SQL job store").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    upgrade = db.add_parser("upgrade", help="migrate the database to the latest schema")
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(handler=cmd_db_upgrade)
    db.add_parser("current", help="show the schema revision").set_defaults(handler=cmd_db_current)

    models = commands.add_parser("models", help="served models and the demo model").add_subparsers(
        dest="models_command", required=True, metavar="ACTION"
    )
    demo_model = models.add_parser(
        "create-demo", help="build the small Llama-architecture demo model and tokenizer"
    )
    demo_model.add_argument("directory")
    demo_model.set_defaults(handler=cmd_models_create_demo)
    add_models_commands(models)

    add_jobs_commands(commands)

    ray = commands.add_parser("ray", help="the embedded Ray head").add_subparsers(
        dest="ray_command", required=True, metavar="ACTION"
    )
    ray.add_parser("status", help="show the embedded head").set_defaults(handler=cmd_ray_status)
    ray.add_parser("stop", help="stop the embedded head").set_defaults(handler=cmd_ray_stop)

    demo = commands.add_parser("demo", help="build the demo model, serve, run a short session")
    demo.add_argument("--port", type=int, default=0, help="0 picks a free port")
    demo.add_argument(
        "--keep-ray", action="store_true", help="leave the embedded Ray head running afterwards"
    )
    demo.set_defaults(handler=cmd_demo)
    return parser


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"CORRAL_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise CliError(f"bad configuration: {problems}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request from the client library drowns the demo's transcript.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = _load_settings()
        args.handler(settings, args)
    except CliError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
