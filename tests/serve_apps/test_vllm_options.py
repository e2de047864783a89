"""Deployment options of `engine: vllm` LLM apps, without vLLM: the replica runs in the
vLLM env (runtime_env py_executable), a tensor-parallel replica's GPUs stay on one node,
and a missing env is a clear error before anything is deployed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from corral.serving.deployer import ModelDeployError, ServeDeployer
from corral.serving.kinds import NotServable
from serve_apps.deployment import tensor_parallel_size
from serve_apps.llm import LLMAppConfig, deployment_options
from serve_apps.vllm_env import VLLMEnvironmentMissing


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    return python


def _config(**fields: Any) -> LLMAppConfig:
    return LLMAppConfig.model_validate({"name": "m", "model_dir": "/m"} | fields)


def test_a_vllm_replica_runs_in_the_vllm_env(fake_python: Path) -> None:
    options = deployment_options(_config(engine="vllm", vllm_python=str(fake_python)))
    actor = options["ray_actor_options"]
    assert actor["runtime_env"] == {"py_executable": str(fake_python)}
    assert "placement_group_bundles" not in options
    # The transformers engine stays in the cluster's own env.
    assert "runtime_env" not in deployment_options(_config())["ray_actor_options"]


def test_tensor_parallel_gpus_are_packed_on_one_node(fake_python: Path) -> None:
    config = _config(
        engine="vllm", vllm_python=str(fake_python), gpus_per_replica=4, cpus_per_replica=2
    )
    options = deployment_options(config)
    assert tensor_parallel_size(config) == 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["placement_group_bundles"] == [
        {"CPU": 2.0, "GPU": 1.0},
        {"GPU": 1.0},
        {"GPU": 1.0},
        {"GPU": 1.0},
    ]
    assert options["ray_actor_options"]["num_gpus"] == 0  # the workers hold the GPUs
    # One GPU, a share of one, or none: one shard, the replica holds what it asked for.
    for gpus in (0.0, 0.5, 1.0):
        single = _config(engine="vllm", vllm_python=str(fake_python), gpus_per_replica=gpus)
        assert tensor_parallel_size(single) == 1
        assert "placement_group_bundles" not in deployment_options(single)
    # The transformers engine spreads layers itself (device_map): no placement group.
    assert "placement_group_bundles" not in deployment_options(_config(gpus_per_replica=4))
    with pytest.raises(ValueError, match="whole number of GPUs"):
        deployment_options(
            _config(engine="vllm", vllm_python=str(fake_python), gpus_per_replica=1.5)
        )


def test_a_missing_vllm_env_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "python"
    with pytest.raises(VLLMEnvironmentMissing, match=r"scripts/setup-vllm\.sh"):
        deployment_options(_config(engine="vllm", vllm_python=str(missing)))
    deployer = ServeDeployer(vllm_python=missing)
    with pytest.raises(NotServable, match="its own Python environment"):
        deployer.check_engine("vllm")
    deployer.check_engine("transformers")  # needs nothing


def test_the_deployer_refuses_a_vllm_model_without_the_env(tmp_path: Path) -> None:
    from corral.serving.catalog import ModelSpec

    spec = ModelSpec.model_validate({"name": "m", "checkpoint_dir": "/m", "engine": "vllm"})
    deployer = ServeDeployer(vllm_python=tmp_path / "nowhere" / "python")
    with pytest.raises(ModelDeployError, match=r"scripts/setup-vllm\.sh"):
        deployer.deploy(spec, app_name="llm-m")
