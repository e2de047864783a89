"""The settings (CORRAL_* variables), loaded once by the first command that needs them
and kept on click's root context: `--help` and the commands that only talk to a running
server neither wait for them nor fail on a bad one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from corral.cli.output import CliError

if TYPE_CHECKING:
    from corral.config import Settings


def load_settings() -> Settings:
    """The settings, or a CliError naming each bad variable in one line."""
    from pydantic import ValidationError

    from corral.config import Settings

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"CORRAL_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise CliError(f"bad configuration: {problems}") from None


def settings_of(ctx: typer.Context) -> Settings:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = load_settings()
    settings: Settings = root.obj
    return settings
