"""`corral models create-demo | list | scale`: the demo models on disk, and the models a
running server serves (its models API, `--url`, bearer key from CORRAL_API_KEY)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from corral.cli import remote
from corral.cli.output import JsonOption, fail, print_json, print_table

if TYPE_CHECKING:
    from corral.api.models import ModelInfo

DEFAULT_WAIT_S = 300.0
# Serve's application statuses, coloured on a terminal.
STATUS_STYLES = {
    "RUNNING": "green",
    "DEPLOYING": "yellow",
    "UPDATING": "yellow",
    "DEPLOY_FAILED": "bold red",
    "UNHEALTHY": "bold red",
    "NOT_STARTED": "dim",
}

app = typer.Typer(help="served models and the demo model", no_args_is_help=True)


def at_least(minimum: int) -> Callable[[int | None], int | None]:
    """An option callback refusing counts below `minimum`."""

    def check(value: int | None) -> int | None:
        if value is not None and value < minimum:
            raise typer.BadParameter(f"must be at least {minimum}")
        return value

    return check


@app.command("create-demo")
def create_demo(
    directory: Path,
    json_output: JsonOption = False,
) -> None:
    """Build the small Llama-architecture demo model and tokenizer in DIRECTORY, and the
    demo reward model trained on its replies beside it (DIRECTORY-reward), and the demo
    guard models (DIRECTORY-llama-guard, DIRECTORY-prompt-guard)."""
    from corral.demo_guards import (
        build_demo_llama_guard,
        build_demo_prompt_guard,
        guard_dirs_beside,
    )
    from corral.demo_model import build_demo_model, describe
    from corral.demo_reward import build_demo_reward_model, reward_dir_beside

    built = build_demo_model(directory)
    reward = build_demo_reward_model(reward_dir_beside(built), policy_dir=built)
    llama_guard_dir, prompt_guard_dir = guard_dirs_beside(built)
    guards = [build_demo_llama_guard(llama_guard_dir), build_demo_prompt_guard(prompt_guard_dir)]
    if json_output:
        print_json(
            {
                "directory": str(built),
                "description": describe(built),
                "reward_directory": str(reward),
                "reward_description": describe(reward),
                "guard_directories": [str(guard) for guard in guards],
            }
        )
    else:
        print(f"demo model ready in {built}: {describe(built)}")
        print(f"demo reward model ready in {reward}: {describe(reward)}")
        for guard in guards:
            print(f"demo guard model ready in {guard}: {describe(guard)}")


@app.command("list")
def list_models(
    url: remote.UrlOption = remote.DEFAULT_URL, json_output: JsonOption = False
) -> None:
    """Models a running server serves, with replicas."""
    with remote.connect(url) as client:
        models = client.list_models()
    if json_output:
        print_json({"data": models})
    else:
        print_table(*models_table(models), status_styles=STATUS_STYLES)


@app.command(
    "scale",
    help="Change a model's replica bounds in place (requests in flight finish); a shared "
    f"model needs an operator key in {remote.API_KEY_ENV}.",
)
def scale(
    name: Annotated[str, typer.Argument(metavar="NAME", help="model name or alias")],
    min_replicas: Annotated[
        int | None, typer.Option("--min", callback=at_least(0), help="minimum replicas")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option("--max", callback=at_least(1), help="maximum replicas")
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(callback=at_least(1), help="exactly N replicas (min = max = N)"),
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="wait until the running replicas fit the bounds")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds --wait waits")] = DEFAULT_WAIT_S,
    url: remote.UrlOption = remote.DEFAULT_URL,
    json_output: JsonOption = False,
) -> None:
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        fail("give either --replicas or --min/--max")
    if replicas is None and min_replicas is None and max_replicas is None:
        fail("give --replicas, --min or --max")
    with remote.connect(url) as client:
        scaled = client.scale_model(
            name, min_replicas=min_replicas, max_replicas=max_replicas, replicas=replicas
        )
        if not json_output:
            print(
                f"{scaled.name}: replicas {scaled.min_replicas}..{scaled.max_replicas}, "
                f"{scaled.replicas} running now"
            )
        running = client.wait_for_replicas(scaled.name, timeout_s=timeout) if wait else None
    if json_output:
        print_json({"scaled": scaled, "running": running})
    elif running is not None:
        print(f"{running.name}: {running.replicas} running")


def models_table(models: list[ModelInfo]) -> tuple[list[str], list[list[str]]]:
    header = ["NAME", "SOURCE", "STATUS", "REPLICAS", "MIN", "MAX", "GPUS", "ALIASES"]
    rows = [
        [
            m.name,
            m.source,
            m.status,
            str(m.replicas),
            str(m.min_replicas),
            str(m.max_replicas),
            f"{m.gpus_per_replica:g}",
            ",".join(m.aliases) or "-",
        ]
        for m in models
    ]
    return header, rows
