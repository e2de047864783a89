"""The cluster files name real code: each Serve config's import_path resolves to a
builder that accepts its args."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray.serve import Application

ROOT = Path(__file__).resolve().parents[1]


def test_serve_config_import_paths_build_applications() -> None:
    config = yaml.safe_load((ROOT / "cluster" / "serve-config.yaml").read_text())
    assert config["applications"]
    for app in config["applications"]:
        module_name, _, attribute = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(builder(app["args"]), Application)
        assert app["name"] == f"llm-{app['args']['name']}"
