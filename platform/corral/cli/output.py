"""How `corral` commands print: rich tables and colour on a terminal, plain aligned
columns when stdout is not one (pipes, logs, tests), JSON for scripts (`--json`), and
one line on stderr for a failure (`CliError`, exit status 2)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, NoReturn

import typer

JsonOption = Annotated[bool, typer.Option("--json", help="print JSON, for scripts")]


class CliError(Exception):
    """A problem to report to the user in one line, with exit status 2."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def is_terminal() -> bool:
    return sys.stdout.isatty()


def print_json(data: Any) -> None:
    """`data` (API models, lists and dicts of them) as one JSON document on stdout."""
    print(json.dumps(_plain(data), indent=2))


def print_json_line(data: Any) -> None:
    """One compact JSON document per line (JSON Lines), for output that streams."""
    print(json.dumps(_plain(data)), flush=True)


def print_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    status_styles: Mapping[str, str] | None = None,
) -> None:
    """A table: rich on a terminal (the STATUS column coloured by `status_styles`),
    otherwise columns padded with two spaces, the last one not padded."""
    if not is_terminal():
        print(plain_table(header, rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*header, header_style="bold", box=None, pad_edge=False)
    status = header.index("STATUS") if "STATUS" in header else None
    for row in rows:
        cells = list(row)
        if status is not None and status_styles:
            style = status_styles.get(cells[status], "")
            cells[status] = f"[{style}]{cells[status]}[/]" if style else cells[status]
        table.add_row(*cells)
    Console().print(table)


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)), line[-1]])
        for line in lines
    )


def _plain(data: Any) -> Any:
    if hasattr(data, "model_dump"):  # an API model; pydantic is not imported for `--help`
        return data.model_dump(mode="json")
    if isinstance(data, Mapping):
        return {key: _plain(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_plain(item) for item in data]
    return data
