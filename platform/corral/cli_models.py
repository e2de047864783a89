"""`corral models list` and `corral models scale`: clients of a running server's models
API (`--url`, bearer key from `CORRAL_API_KEY`). `add_models_commands` hooks them into
the `corral models` sub-commands of `corral.cli`."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any, NoReturn

import httpx

from corral.config import Settings

DEFAULT_URL = "http://127.0.0.1:8321"
API_KEY_ENV = "CORRAL_API_KEY"
DEFAULT_WAIT_S = 300.0


class ApiCommandError(Exception):
    """The server refused a request or could not be reached; one line for the user."""


def api_client(url: str, api_key: str | None, *, timeout_s: float = 600.0) -> httpx.Client:
    """An HTTP client for the server at `url`. The timeout is long: registering and
    scaling wait on Ray."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=timeout_s)


def list_models(client: httpx.Client) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = call_api(client, "GET", "/models")["data"]
    return data


def scale_model(
    client: httpx.Client,
    model: str,
    *,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    body = {
        key: value
        for key, value in {
            "model": model,
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "replicas": replicas,
        }.items()
        if value is not None
    }
    return call_api(client, "POST", "/models/scale", json=body)


def wait_for_bounds(
    client: httpx.Client, model: str, *, timeout_s: float, poll_s: float = 1.0
) -> dict[str, Any]:
    """Poll until the model's running replicas lie within its bounds (at least one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = _find(list_models(client), model)
        low = max(1, info["min_replicas"])
        if low <= info["replicas"] <= info["max_replicas"]:
            return info
        if time.monotonic() > deadline:
            raise ApiCommandError(
                f"{model}: {info['replicas']} replicas running after {timeout_s:g} s, "
                f"bounds {info['min_replicas']}..{info['max_replicas']}"
            )
        time.sleep(poll_s)


def format_models(models: list[dict[str, Any]]) -> str:
    header = ("NAME", "SOURCE", "STATUS", "REPLICAS", "MIN", "MAX", "GPUS", "ALIASES")
    rows = [header] + [
        (
            m["name"],
            m["source"],
            m["status"],
            str(m["replicas"]),
            str(m["min_replicas"]),
            str(m["max_replicas"]),
            f"{m['gpus_per_replica']:g}",
            ",".join(m["aliases"]) or "-",
        )
        for m in models
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ argparse


def cmd_models_list(_settings: Settings, args: argparse.Namespace) -> None:
    with client_from_args(args) as client:
        print(format_models(run_or_fail(list_models, client)))


def cmd_models_scale(_settings: Settings, args: argparse.Namespace) -> None:
    if args.replicas is not None and (args.min is not None or args.max is not None):
        fail("give either --replicas or --min/--max")
    if args.replicas is None and args.min is None and args.max is None:
        fail("give --replicas, --min or --max")
    with client_from_args(args) as client:
        result = run_or_fail(
            scale_model,
            client,
            args.name,
            min_replicas=args.min,
            max_replicas=args.max,
            replicas=args.replicas,
        )
        print(
            f"{result['name']}: replicas {result['min_replicas']}..{result['max_replicas']}, "
            f"{result['replicas']} running now"
        )
        if args.wait:
            info = run_or_fail(wait_for_bounds, client, result["name"], timeout_s=args.timeout)
            print(f"{info['name']}: {info['replicas']} running")


def add_models_commands(models: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `list` and `scale` to the `corral models` sub-commands."""
    listing = models.add_parser("list", help="models a running server serves, with replicas")
    add_connection_options(listing)
    listing.set_defaults(handler=cmd_models_list)

    scale = models.add_parser(
        "scale",
        help="change a model's replica bounds in place (requests in flight finish); a "
        f"shared model needs an operator key in {API_KEY_ENV}",
    )
    scale.add_argument("name", help="model name or alias")
    scale.add_argument("--min", type=_count(0), help="minimum replicas")
    scale.add_argument("--max", type=_count(1), help="maximum replicas")
    scale.add_argument("--replicas", type=_count(1), help="exactly N replicas (min = max = N)")
    scale.add_argument(
        "--wait", action="store_true", help="wait until the running replicas fit the bounds"
    )
    scale.add_argument(
        "--timeout", type=float, default=DEFAULT_WAIT_S, help="seconds --wait waits (300)"
    )
    add_connection_options(scale)
    scale.set_defaults(handler=cmd_models_scale)


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"the Corral server ({DEFAULT_URL}); key from {API_KEY_ENV}",
    )


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def client_from_args(args: argparse.Namespace) -> httpx.Client:
    return api_client(args.url, os.environ.get(API_KEY_ENV) or None)


def run_or_fail(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a client function; turn its failure into the CLI's one-line error."""
    try:
        return function(*args, **kwargs)
    except ApiCommandError as exc:
        fail(str(exc))


def fail(message: str) -> NoReturn:
    from corral.cli import CliError  # corral.cli imports this module

    raise CliError(message)


def call_api(client: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ApiCommandError(
            f"cannot reach the Corral server at {client.base_url}: {exc}"
        ) from None
    if response.status_code >= 400:
        raise ApiCommandError(f"{method} {path}: {response.status_code} {_message(response)}")
    if not response.content:
        return {}  # the spec's submissions answer 200 with no body
    body: dict[str, Any] = response.json()
    return body


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason_phrase


def _find(models: list[dict[str, Any]], name: str) -> dict[str, Any]:
    # A tenant's registered model shadows a file model of the same name.
    for model in sorted(models, key=lambda m: m["source"] != "registered"):
        if name == model["name"] or name in model["aliases"]:
            return model
    raise ApiCommandError(f"no model {name!r}")
