"""The `corral` command as a whole: `--help` loads no heavy library, shell completion
is Typer's, and commands that read no setting do not trip over a bad one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corral.cli import CliError, main, run

HEAVY = ("torch", "transformers", "ray", "sqlalchemy", "httpx", "corral.client", "corral.app")


def test_help_loads_nothing_heavy() -> None:
    probe = (
        "import sys; from corral.cli import main;"
        "codes = [main([*a, '--help']) for a in ([], ['jobs'], ['jobs', 'metrics'], ['serve'])];"
        f"print(codes, [m for m in {HEAVY!r} if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines()[-1] == "[0, 0, 0, 0] []"


def test_shell_completion_is_offered(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--show-completion", "bash"]) == 0
    assert "_CORRAL_COMPLETE" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["jobs", "no-such-action"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_settings_are_read_only_by_commands_that_need_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    assert main(["db", "current", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["current"] is None  # nothing migrated yet
    monkeypatch.setenv("CORRAL_FETCH_TIMEOUT_S", "-1")
    with pytest.raises(CliError, match="CORRAL_FETCH_TIMEOUT_S"):
        run(["db", "current"])
    # A client of a running server reads no setting: it fails only on the server.
    with pytest.raises(CliError, match="cannot reach the Corral server"):
        run(["jobs", "list", "--url", "http://127.0.0.1:9"])
