"""The settings the root command loads once (from CORRAL_* variables), handed to the
commands that need them through click's context object."""

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
    settings: Settings = ctx.find_root().obj
    return settings
