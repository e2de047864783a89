"""The deployer's code version: what decides whether Serve restarts replicas. The
deployer against a live Serve is exercised through the registry tests."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from corral.serving.catalog import ModelSpec
from corral.serving.deployer import code_version
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engine
from serve_apps.llm import transformers_engine


def _config(**changes: object) -> dict[str, object]:
    spec = ModelSpec(name="m", checkpoint_dir=Path("/w")).model_copy(update=changes)
    return spec.app_config(app_name="llm-m")


def test_replica_bounds_keep_the_code_version() -> None:
    base = code_version(_config(), transformers_engine)
    scaled = _config(min_replicas=3, max_replicas=5, target_ongoing_requests=7.0)
    assert code_version(scaled, transformers_engine) == base


def test_anything_a_replica_is_built_from_changes_it() -> None:
    base = code_version(_config(), transformers_engine)
    for change in (
        {"checkpoint_dir": Path("/other")},
        {"adapter_dir": Path("/adapter")},
        {"max_batch_size": 16},
        {"gpus_per_replica": 1.0},
        {"dtype": "bfloat16"},
    ):
        assert code_version(_config(**change), transformers_engine) != base, change
    fast = partial(scripted_engine, ScriptedEngineConfig("a", 0.0))
    slow = partial(scripted_engine, ScriptedEngineConfig("a", 0.5))
    assert len({base, code_version(_config(), fast), code_version(_config(), slow)}) == 3
    assert code_version(_config(), fast) == code_version(
        _config(), partial(scripted_engine, ScriptedEngineConfig("a", 0.0))
    )
