"""The recipes' launch configs: a launch config stored before the shared part was split
out still loads and dumps back the same, and the shared checks hold for every recipe."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from jobs.config import DPOJobConfig, SFTJobConfig, TrainingJobConfig

# `jobs.launch` columns as the API stored them when each recipe declared all its fields.
STORED_SFT = json.loads(
    '{"job_key": "t-0123", "model_dir": "/m", "output_dir": "/o", "rows": [{"dialog": '
    '[{"role": "user", "content": "Which colour?"}, {"role": "assistant", "content": '
    '"Blue."}]}], "validation_rows": [], "algorithm": "lora", "adapter": '
    '{"lora_attn_modules": ["q_proj"], "apply_lora_to_mlp": false, "apply_lora_to_output": '
    'false, "rank": 4, "alpha": 8}, "optimizer": {"optimizer_type": "adamw", "lr": 0.001, '
    '"lr_min": 0.0001, "weight_decay": 0.0}, "n_epochs": 2, "n_iters": 3, "batch_size": 1, '
    '"shuffle": true, "seed": 0, "max_seq_len": 2048, "num_workers": 2, "use_gpu": false, '
    '"max_failures": 2, "zero_stage": null, "cpu_offload": false, '
    '"activation_checkpointing": false, "dtype": "float32"}'
)
STORED_DPO = json.loads(
    '{"job_key": "t-0123", "model_dir": "/m", "output_dir": "/o", "rows": [{"prompt": '
    '[{"role": "user", "content": "Which colour?"}], "chosen": "Blue.", "rejected": "Red."}], '
    '"validation_rows": [], "dpo": {"reward_scale": 0.1, "reward_clip": 0.0, "epsilon": 0.0, '
    '"gamma": 0.0}, "optimizer": {"optimizer_type": "adamw", "lr": 0.001, "lr_min": 0.0001, '
    '"weight_decay": 0.0}, "n_epochs": 2, "n_iters": 3, "batch_size": 1, "shuffle": true, '
    '"seed": 0, "max_seq_len": 2048, "num_workers": 2, "use_gpu": false, "max_failures": 2, '
    '"zero_stage": null, "cpu_offload": false, "activation_checkpointing": false, '
    '"dtype": "float32"}'
)
CASES = [(SFTJobConfig, STORED_SFT), (DPOJobConfig, STORED_DPO)]


@pytest.mark.parametrize(("config_class", "stored"), CASES)
def test_a_stored_launch_config_loads_and_dumps_back_flat(
    config_class: type[TrainingJobConfig], stored: dict[str, Any]
) -> None:
    config = config_class.model_validate(stored)
    assert config.model_dump(mode="json") == stored


@pytest.mark.parametrize(("config_class", "stored"), CASES)
def test_shared_settings_are_checked_for_every_recipe(
    config_class: type[TrainingJobConfig], stored: dict[str, Any]
) -> None:
    settings = stored
    with pytest.raises(ValidationError, match="no training rows"):
        config_class.model_validate(settings | {"rows": []})
    for stage in (None, 0):
        with pytest.raises(ValidationError, match="cpu_offload needs DeepSpeed ZeRO"):
            config_class.model_validate(settings | {"cpu_offload": True, "zero_stage": stage})
    with pytest.raises(ValidationError, match="validation_rows\\[0\\]: "):
        config_class.model_validate(settings | {"validation_rows": [{"neither": "kind"}]})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        config_class.model_validate(settings | {"job_uuid": "old"})
