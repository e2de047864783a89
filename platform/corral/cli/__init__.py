"""The `corral` command line, on Typer: one module per command group (`serve`, `models`,
`jobs`; the small `db`, `ray` and `demo` commands sit in `app`). Commands that talk to
a running server go through `corral.client`; `main(argv)` is the entry point."""

from corral.cli.app import app, main, run
from corral.cli.output import CliError

__all__ = ["CliError", "app", "main", "run"]
