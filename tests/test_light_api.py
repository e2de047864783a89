"""The API process stays light: building the app and validating a submission load neither
torch nor transformers nor peft (tokenizers and jinja2 are light, and fine). Run in a fresh
interpreter, since the test process itself has long imported all three."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "peft")

# Records who first imports a heavy module, so a failure names the chain to cut.
PROGRAM = """
import importlib.abc, json, sys, traceback

HEAVY = set(sys.argv[3].split(","))
chains = {}

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in HEAVY and top not in chains:
            frames = traceback.extract_stack()[:-1]
            chains[top] = [f"{f.filename}:{f.lineno} {f.line}" for f in frames if f.line]
        return None

sys.meta_path.insert(0, Watch())

import corral.app
from corral.app import create_app
from corral.config import Settings
from corral.services.fine_tuning import LaunchPlanner
from jobs.config import DPOJobConfig, SFTJobConfig

create_app(Settings(home=sys.argv[1]))
configs = json.loads(sys.argv[2])
SFTJobConfig.model_validate(configs["sft"])
DPOJobConfig.model_validate(configs["dpo"])
print(json.dumps(chains))
"""

USER = {"role": "user", "content": "Which colour?"}
SHARED = {
    "job_key": "t-light",
    "database_url": "sqlite://",
    "model_dir": "/models/demo",
    "output_dir": "/checkpoints/t/light",
    "validation_rows": [],
    "optimizer": {"optimizer_type": "adamw", "lr": 1e-3, "lr_min": 1e-4, "weight_decay": 0.0},
    "n_epochs": 1,
    "n_iters": 1,
    "batch_size": 1,
}
CONFIGS = {
    "sft": SHARED
    | {
        "rows": [{"dialog": [USER, {"role": "assistant", "content": "Blue."}]}],
        "algorithm": "lora",
        "adapter": {
            "lora_attn_modules": ["q_proj", "v_proj"],
            "apply_lora_to_mlp": False,
            "apply_lora_to_output": False,
            "rank": 4,
            "alpha": 8,
        },
    },
    "dpo": SHARED
    | {
        "rows": [{"prompt": [USER], "chosen": "Blue.", "rejected": "Red."}],
        "dpo": {"reward_scale": 0.1, "reward_clip": 0.0, "epsilon": 0.0, "gamma": 0.0},
    },
}


def test_building_the_app_and_validating_jobs_imports_no_torch(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CORRAL_")}
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path), json.dumps(CONFIGS), ",".join(HEAVY)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    chains: dict[str, list[str]] = json.loads(result.stdout.splitlines()[-1])
    assert chains == {}, "\n".join(
        f"{module} is imported by:\n  " + "\n  ".join(chain) for module, chain in chains.items()
    )
