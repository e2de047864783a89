"""The repository layout the user asked for, and the trap it must never fall into."""

from __future__ import annotations

import ast
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


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_serving_and_serve_apps_never_import_the_api_layer() -> None:
    """Serving sits below the API: routes and services may use it, never the reverse.
    serve_apps travels to replicas, which have no control plane at all."""
    for folder in (ROOT / "platform" / "corral" / "serving", ROOT / "serve_apps"):
        for path in folder.rglob("*.py"):
            upward = {n for n in _imports(path) if n.startswith(("corral.api", "corral.routes"))}
            if folder.name == "serve_apps":
                upward = {n for n in _imports(path) if n.startswith("corral")}
            assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}"


def test_routes_stay_http_and_services_never_import_routes() -> None:
    """Routes parse, call a service and shape the answer: no SQL session, table or Ray
    call of their own (the stores' enums, e.g. JobStatus, are plain values and fine).
    Services sit below the routes."""
    below_routes = ("sqlalchemy", "ray", "corral.store.db", "corral.store.tables", "corral.serving")
    for path in (ROOT / "platform" / "corral" / "routes").rglob("*.py"):
        reached = {n for n in _imports(path) if n.startswith(below_routes)}
        assert not reached, f"{path.relative_to(ROOT)} imports {sorted(reached)}"
    for path in (ROOT / "platform" / "corral" / "services").rglob("*.py"):
        upward = {n for n in _imports(path) if n.startswith("corral.routes")}
        assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}"
