"""The `corral` command, run as a user runs it: in a subprocess, with its own home."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.cli.serve import is_loopback_host
from corral.store import migrate


def corral(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"CORRAL_HOME": str(home)}
    env.pop("CORRAL_API_KEYS", None)
    env.pop("CORRAL_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("no-such-host.invalid", False),
    ],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_serve_refuses_a_public_bind_without_keys(tmp_path: Path) -> None:
    result = corral(tmp_path, "serve", "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in result.stderr
    assert not (tmp_path / "corral.db").exists()  # refused before touching anything


def test_db_upgrade(tmp_path: Path) -> None:
    result = corral(tmp_path, "db", "upgrade")
    assert result.returncode == 0, result.stderr
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    assert migrate.current_revision(url) == migrate.head_revision()
    current = corral(tmp_path, "db", "current")
    assert f"current: {migrate.head_revision()}" in current.stdout


@pytest.mark.slow
def test_models_create_demo(
    tmp_path: Path, demo_llama_guard_dir: Path, demo_prompt_guard_dir: Path
) -> None:
    from corral.demo_guards import guard_dirs_beside

    target = tmp_path / "demo"
    # The guard models beside it come from the session's builds (tests/test_demo_guards.py
    # covers building them): the command finds them current and keeps them.
    for built, beside in zip(
        (demo_llama_guard_dir, demo_prompt_guard_dir), guard_dirs_beside(target), strict=True
    ):
        shutil.copytree(built, beside)
    result = corral(tmp_path, "models", "create-demo", str(target))
    assert result.returncode == 0, result.stderr
    assert f"demo model ready in {target}" in result.stdout
    assert (target / "config.json").is_file()
    assert (target / "tokenizer.json").is_file()
    reward = tmp_path / "demo-reward"  # beside it, where the embedded default looks
    assert f"demo reward model ready in {reward}" in result.stdout
    assert (reward / "config.json").is_file()
    for beside in guard_dirs_beside(target):
        assert (beside / "config.json").is_file()


def test_bad_settings_are_reported_in_one_line(tmp_path: Path) -> None:
    env_home = tmp_path
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "db", "current"],
        env=os.environ | {"CORRAL_HOME": str(env_home), "CORRAL_FETCH_TIMEOUT_S": "-1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "CORRAL_FETCH_TIMEOUT_S" in result.stderr.upper()
    assert "Traceback" not in result.stderr


def test_milvus_status_and_stop_the_embedded_server(tmp_path: Path) -> None:
    from corral.milvus_server import LocalMilvus

    assert "no embedded Milvus server is running" in corral(tmp_path, "milvus", "status").stdout
    uri = LocalMilvus(tmp_path).ensure()
    try:
        status = corral(tmp_path, "milvus", "status", "--json")
        assert json.loads(status.stdout)["uri"] == uri
        assert json.loads(corral(tmp_path, "milvus", "stop", "--json").stdout) == {"stopped": True}
        assert LocalMilvus(tmp_path).running() is None
    finally:
        LocalMilvus(tmp_path).stop()
