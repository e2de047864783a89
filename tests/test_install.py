"""`pip install .` into a fresh virtual environment outside the checkout gives a working
`corral` command, and the job and Serve code import from the installed wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_wheel_installs_into_a_fresh_venv(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    # Build with this environment's setuptools (no network), install without
    # dependencies, and borrow the dependencies from this environment's site-packages
    # through PYTHONPATH. The editable install of corral is not visible that way: its
    # import hook is wired through a .pth file, and PYTHONPATH entries skip .pth files.
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        wheels,
        ROOT,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("corral-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    run(bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = os.environ | {
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "CORRAL_HOME": str(tmp_path / "home"),
    }
    env.pop("CORRAL_DATABASE_URL", None)
    where = run(
        bin_dir / "python",
        "-c",
        # corral.app imports every package of the server (agents, memory, ...), and
        # jobs.sdg.job every one of the jobs.
        "import corral, corral.app, jobs.reporting, jobs.sdg.job, serve_apps, corral.migrations;"
        "print(corral.__file__); print(jobs.reporting.__file__)",
        cwd=outside,
        env=env,
    )
    for line in where.splitlines():
        assert line.startswith(str(env_dir)), where
    # The jobs dashboard's files are package data of the wheel.
    shipped = run(
        bin_dir / "python",
        "-c",
        "from importlib import resources; d = resources.files('corral.dashboard');"
        "print(sorted(p.name for p in d.iterdir() if p.suffix != '.py'))",
        cwd=outside,
        env=env,
    )
    for name in ("dashboard.css", "dashboard.js", "favicon.svg", "index.html", "login.html"):
        assert name in shipped, shipped

    assert "serve" in run(bin_dir / "corral", "--help", cwd=outside, env=env)
    assert "database at revision" in run(bin_dir / "corral", "db", "upgrade", cwd=outside, env=env)


def test_every_package_directory_is_in_the_wheel() -> None:
    """A package directory missing from pyproject's list is missing from the wheel, and
    works from the checkout all the same (jobs.sdg, corral.agents and corral.memory once
    were): every directory with an __init__.py is listed, under its mapped name."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {Path(path): name for name, path in setuptools["package-dir"].items()}
    found = set()
    for root, name in mapped.items():
        for init in (ROOT / root).rglob("__init__.py"):
            inner = init.parent.relative_to(ROOT / root).parts
            found.add(".".join((name, *inner)))
    assert found == set(setuptools["packages"]), found ^ set(setuptools["packages"])
