"""The registration-time check that an adapter fits a base's vLLM replicas, on adapter
files as peft writes them (adapter_config.json, a safetensors file of LoRA matrices)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from corral.serving.adapters import AdapterMismatch, check_adapter

BASE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
}
PREFIX = "base_model.model.model.layers"


def write(directory: Path, config: dict[str, object], shapes: dict[str, tuple[int, int]]) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()},
        str(directory / "adapter_model.safetensors"),
    )
    return directory


@pytest.fixture
def base(tmp_path: Path) -> Path:
    directory = tmp_path / "base"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(BASE))
    return directory


def lora(
    layer: int, module: str, rank: int, width_in: int, width_out: int
) -> dict[str, tuple[int, int]]:
    name = f"{PREFIX}.{layer}.{module}"
    return {f"{name}.lora_A.weight": (rank, width_in), f"{name}.lora_B.weight": (width_out, rank)}


def test_an_adapter_for_this_base_fits(base: Path, tmp_path: Path) -> None:
    shapes = lora(0, "self_attn.q_proj", 8, 64, 64) | lora(1, "mlp.down_proj", 8, 128, 64)
    check_adapter(write(tmp_path / "ok", {"r": 8}, shapes), base, max_rank=8)


@pytest.mark.parametrize(
    ("config", "shapes", "message"),
    [
        ({"r": 16}, lora(0, "self_attn.q_proj", 16, 64, 64), "rank 16 is above"),
        ({"r": 8, "rank_pattern": {"q_proj": 32}}, {}, "rank 32 is above"),
        ({"r": 8, "use_dora": True}, {}, "DoRA"),
        ({"r": 8, "modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
        ({"r": 8, "peft_type": "IA3"}, {}, "not a LoRA adapter"),
        ({"r": 8}, lora(5, "self_attn.q_proj", 8, 64, 64), "layer 5, the base only 2"),
        ({"r": 8}, lora(0, "self_attn.q_proj", 8, 96, 64), "another base"),
    ],
)
def test_what_cannot_ride_on_the_base_is_refused(
    base: Path,
    tmp_path: Path,
    config: dict[str, object],
    shapes: dict[str, tuple[int, int]],
    message: str,
) -> None:
    adapter = write(tmp_path / "adapter", config, shapes)
    with pytest.raises(AdapterMismatch, match=message):
        check_adapter(adapter, base, max_rank=16 if message == "rank 32 is above" else 8)
