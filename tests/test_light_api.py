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


# A job's driver, from `jobs.launch.run` to the trainer's fit() (stubbed: it would start
# Ray Train), with the launcher's submission time in its environment.
DRIVER_PROGRAM = """
import importlib.abc, json, os, sys, time, traceback

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
from corral.store import migrate
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStore
from jobs import attempts, launch
from jobs.report_target import ReportTarget

url = f"sqlite:///{sys.argv[1]}/corral.db"
migrate.upgrade(url)
database = Database(url)
settings = json.loads(sys.argv[2])
with database.transaction() as session:
    JobStore(session).create(job_uuid="light", tenant="t", kind=JobKind.SUPERVISED_FINE_TUNE,
                             request={}, launch=settings["sft"])
    key = JobStore(session).get("light", tenant="t").key
fitted = []
attempts.fit = lambda config, train_loop, **_: fitted.append(train_loop.__name__)
os.environ["CORRAL_SUBMITTED_AT"] = str(time.time() - 1)
status = launch.run(key, ReportTarget(database_url=url))
with database.transaction() as session:
    lines = [line.line for line in JobStore(session).log_lines(key)]
print(json.dumps({"chains": chains, "fitted": fitted, "status": str(status), "lines": lines}))
"""


def test_a_training_job_driver_leaves_the_recipes_to_the_workers(tmp_path: Path) -> None:
    """The driver only starts the trainer: transformers, peft, bitsandbytes and DeepSpeed
    are the workers' imports (seconds of CPU before Ray Train starts any worker); it hands
    Ray Train the worker entry that imports the recipe, and logs when it was ready."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CORRAL_")}
    heavy = ("transformers", "peft", "bitsandbytes", "deepspeed")
    result = subprocess.run(
        [sys.executable, "-c", DRIVER_PROGRAM, str(tmp_path), json.dumps(CONFIGS), ",".join(heavy)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["chains"] == {}, "\n".join(
        f"{module} is imported by:\n  " + "\n  ".join(chain)
        for module, chain in outcome["chains"].items()
    )
    assert outcome["fitted"] == ["sft_train_loop"]
    assert outcome["status"] == "completed"
    [ready] = [line for line in outcome["lines"] if line.startswith("phase: driver ready ")]
    assert "after submission (Ray Jobs started it in " in ready, ready
