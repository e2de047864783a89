"""The `corral` command: serve the API, manage the database, the embedded Ray head and
the demo model, run the scripted demo, and drive a running server's models and jobs.

Commands import what they need when they run: `corral --help` does not wait for Ray,
torch, transformers or even the HTTP client to load."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from corral.cli import jobs, models, sdg
from corral.cli.output import CliError, JsonOption, print_json
from corral.cli.serve import serve
from corral.cli.state import settings_of

app = typer.Typer(
    name="corral",
    help=__doc__.split("\n\n")[0] if __doc__ else None,
    no_args_is_help=True,
)
db = typer.Typer(help="the SQL job store", no_args_is_help=True)
ray = typer.Typer(help="the embedded Ray head", no_args_is_help=True)
milvus = typer.Typer(help="the embedded Milvus Lite server", no_args_is_help=True)
app.command(name="serve", help="upgrade the database, start or join Ray, serve")(serve)
app.add_typer(db, name="db")
app.add_typer(models.app, name="models")
app.add_typer(jobs.app, name="jobs")
app.add_typer(sdg.app, name="sdg")
app.add_typer(ray, name="ray")
app.add_typer(milvus, name="milvus")


@app.callback()
def root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request from the client library drowns the demo's transcript.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@db.command("upgrade")
def db_upgrade(ctx: typer.Context, revision: str = "head", json_output: JsonOption = False) -> None:
    """Migrate the database to the latest schema (or to REVISION)."""
    from corral.store import migrate

    url = settings_of(ctx).resolved_database_url
    migrate.upgrade(url, revision)
    current = migrate.current_revision(url)
    if json_output:
        print_json({"revision": current})
    else:
        print(f"database at revision {current}")


@db.command("current")
def db_current(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Show the schema revision."""
    from corral.store import migrate

    current = migrate.current_revision(settings_of(ctx).resolved_database_url)
    head = migrate.head_revision()
    if json_output:
        print_json({"current": current, "head": head})
    else:
        print(f"current: {current or '(empty)'}  head: {head}")


@ray.command("status")
def ray_status(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Show the embedded head."""
    from corral.ray_cluster import LocalRayHead

    head = LocalRayHead(settings_of(ctx).home).find()
    if json_output:
        print_json(
            None
            if head is None
            else {"pid": head.pid, "address": head.address, "dashboard_url": head.dashboard_url}
        )
    elif head is None:
        print("no embedded Ray head is running")
    else:
        print(f"Ray head pid {head.pid} at {head.address}, dashboard {head.dashboard_url}")


@ray.command("stop")
def ray_stop(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Stop the embedded head."""
    from corral.ray_cluster import LocalRayHead

    stopped = LocalRayHead(settings_of(ctx).home).stop()
    if json_output:
        print_json({"stopped": stopped})
    else:
        print("stopped the embedded Ray head" if stopped else "no embedded Ray head was running")


@milvus.command("status")
def milvus_status(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Show the embedded Milvus Lite server (memory banks)."""
    from corral.milvus_server import LocalMilvus

    info = LocalMilvus(settings_of(ctx).home).running()
    if json_output:
        print_json(None if info is None else {"pid": info.pid, "uri": info.uri})
    elif info is None:
        print("no embedded Milvus server is running")
    else:
        print(f"Milvus Lite pid {info.pid} at {info.uri}, data in {info.data_dir}")


@milvus.command("stop")
def milvus_stop(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Stop the embedded Milvus Lite server."""
    from corral.milvus_server import LocalMilvus

    stopped = LocalMilvus(settings_of(ctx).home).stop()
    if json_output:
        print_json({"stopped": stopped})
    else:
        print(
            "stopped the embedded Milvus server"
            if stopped
            else "no embedded Milvus server was running"
        )


@app.command("demo")
def demo(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="0 picks a free port")] = 0,
    keep_ray: Annotated[
        bool, typer.Option(help="leave the embedded Ray head running afterwards")
    ] = False,
) -> None:
    """Build the demo model, serve, run a short session."""
    from corral.demo import DemoFailed, run_demo

    try:
        run_demo(settings_of(ctx), port=port, keep_ray=keep_ray)
    except DemoFailed as exc:
        raise CliError(f"demo failed: {exc}") from None


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status, as `main` does, except that a
    CliError propagates (tests assert on it). The client's errors become CliErrors."""
    try:
        # Standalone: usage errors are shown as Typer shows them, with exit status 2.
        typer.main.get_command(app).main(
            args=list(argv) if argv is not None else None, prog_name="corral"
        )
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else 0 if code is None else 1
    except Exception as exc:
        # Imported here: the client is not loaded unless a command used it.
        from corral.client import CorralAPIError, WaitTimeout

        if isinstance(exc, CorralAPIError | WaitTimeout):
            raise CliError(str(exc)) from None
        raise
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `corral` entry point: an exit status, failures in one line on stderr."""
    try:
        return run(argv)
    except CliError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
