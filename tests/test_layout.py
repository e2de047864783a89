"""The repository layout the user asked for, and the trap it must never fall into."""

from __future__ import annotations

import platform as stdlib_platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_is_not_a_package() -> None:
    """A `platform` package would shadow the standard library module Ray, torch and
    pytest import."""
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert stdlib_platform.__file__ is not None
    assert Path(stdlib_platform.__file__).parent != ROOT / "platform"
    assert callable(stdlib_platform.python_version)


def test_top_level_folders() -> None:
    for name in ("platform/corral", "jobs", "serve_apps", "migrations", "cluster", "tests"):
        assert (ROOT / name).is_dir(), name
    for name in ("pyproject.toml", "README.md", ".ci/run"):
        assert (ROOT / name).is_file(), name


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in readme
    assert "scripts/test.sh" in ci
    assert "scripts/demo.sh" in readme
