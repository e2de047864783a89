"""Whether a LoRA adapter fits a base model's vLLM replicas, read before registering it
(its adapter_config.json and the header of its safetensors file; no torch), so that a bad
adapter is the client's 422 at registration, not a replica's failure at the first request
that names it."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_HEADER_LIMIT = 64 << 20  # a safetensors header is JSON; far below this for any adapter


class AdapterMismatch(ValueError):
    """The adapter cannot ride on that base (the message says why)."""


def check_adapter(adapter_dir: Path, base_dir: Path, *, max_rank: int) -> None:
    """AdapterMismatch unless `adapter_dir` is a LoRA adapter vLLM can serve over the
    model in `base_dir` with room for rank `max_rank`: plain LoRA (no DoRA, no
    modules_to_save), rank at most `max_rank`, and, when its weights are safetensors,
    every LoRA matrix shaped for the base (its layers exist, its sides are the base's
    widths)."""
    config = _json(adapter_dir / "adapter_config.json")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterMismatch(f"a {config.get('peft_type')} adapter is not a LoRA adapter")
    if config.get("use_dora"):
        raise AdapterMismatch("a DoRA adapter (use_dora) cannot ride on vLLM replicas")
    if config.get("modules_to_save"):
        raise AdapterMismatch(
            "an adapter with modules_to_save (whole copied layers) cannot ride on vLLM "
            "replicas; train it without them, or serve it with engine transformers"
        )
    ranks = [config.get("r"), *dict(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise AdapterMismatch(f"adapter_config.json: rank r must be a positive integer ({ranks})")
    rank = max(ranks)
    if rank > max_rank:
        raise AdapterMismatch(
            f"the adapter's rank {rank} is above the base's max_adapter_rank {max_rank}"
        )
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        _check_shapes(_safetensors_shapes(weights), _json(base_dir / "config.json"))


def _check_shapes(shapes: dict[str, list[int]], base: dict[str, Any]) -> None:
    try:
        hidden = int(base["hidden_size"])
        layers = int(base["num_hidden_layers"])
        heads = int(base["num_attention_heads"])
        kv_heads = int(base.get("num_key_value_heads") or heads)
        head_dim = int(base.get("head_dim") or hidden // heads)
        widths = {
            hidden,
            heads * head_dim,
            kv_heads * head_dim,
            int(base.get("intermediate_size") or hidden),
            int(base.get("vocab_size") or hidden),
        }
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise AdapterMismatch(f"the base's config.json lacks its sizes ({exc})") from None
    for name, shape in shapes.items():
        layer = _LAYER.search(name)
        if layer is not None and int(layer.group(1)) >= layers:
            raise AdapterMismatch(
                f"the adapter has weights for layer {layer.group(1)}, the base only "
                f"{layers} layers: it was trained on another base"
            )
        if len(shape) != 2 or not ("lora_A" in name or "lora_B" in name):
            continue
        width = shape[1] if "lora_A" in name else shape[0]
        if width not in widths:
            raise AdapterMismatch(
                f"the adapter's {name} is {shape[0]}x{shape[1]}, which no layer of the base "
                f"(widths {sorted(widths)}) takes: it was trained on another base"
            )


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) != 8:
            raise AdapterMismatch(f"{path.name} is not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > _HEADER_LIMIT:
            raise AdapterMismatch(f"{path.name} is not a safetensors file")
        try:
            header = json.loads(file.read(length))
        except ValueError:
            raise AdapterMismatch(f"{path.name} is not a safetensors file") from None
    return {
        name: list(entry["shape"])
        for name, entry in header.items()
        if isinstance(entry, dict) and isinstance(entry.get("shape"), list)
    }


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterMismatch(f"{path.name}: {exc}") from None
    if not isinstance(value, dict):
        raise AdapterMismatch(f"{path.name} is not a JSON object")
    return value
