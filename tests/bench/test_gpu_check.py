"""bench/gpu_check.py is run by hand on a GPU; its --dry-run runs the same checks on the CPU
at tiny shapes, so the script cannot rot unnoticed between GPU runs: once with everything
installed, once as on the bare GPU machine the device tool lends (no Ray, DeepSpeed,
bitsandbytes, vLLM, nor any of the control plane's services)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# Installed here but not on the bare GPU machine (Python, torch, transformers, peft and
# accelerate, plus the pydantic that bench/gpu_bundle.sh carries). A None in sys.modules
# makes `import x` fail and importlib.util.find_spec("x") say it is absent, as there.
ABSENT_ON_BARE_GPU = (
    "ray", "deepspeed", "bitsandbytes", "vllm", "trl", "datasets", "pyarrow", "pandas",
    "sqlalchemy", "alembic", "psycopg", "fastapi", "starlette", "uvicorn", "httpx",
    "pymilvus", "milvus_lite", "grpc", "sentence_transformers", "tensorboard",
)  # fmt: skip
BARE = f"""
import runpy, sys
for name in {ABSENT_ON_BARE_GPU!r}:
    sys.modules[name] = None
sys.argv = [{str(ROOT / "bench" / "gpu_check.py")!r}, "--dry-run"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _dry_run(tmp_path: Path, *command: str) -> str:
    result = subprocess.run(
        [sys.executable, *command],
        cwd=tmp_path,
        env=os.environ | {"TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_dry_run_prints_every_figure(tmp_path: Path) -> None:
    out = _dry_run(tmp_path, str(ROOT / "bench" / "gpu_check.py"), "--dry-run")
    assert re.search(r"LoRA, DDP path, bf16 autocast .*: \d[\d,]* tokens/s, MFU n/a", out), out
    assert re.search(r"ZeRO-3 \+ LoRA, bf16, .*: \d[\d,]* tokens/s, MFU n/a", out), out
    assert re.search(r"QLoRA \(Linear4bit, NF4\).*loss [\d.]+ -> [\d.]+ \(falls\)", out), out
    assert re.search(r"bf16 autocast vs float32.*\(agree within 1 %\)", out), out
    assert "FAILED" not in out
    assert re.search(r"serving \(transformers engine, bf16.*batch 16: \d[\d,]* tokens/s", out), out
    assert "untested here: vLLM on GPU" in out


def test_dry_run_on_a_bare_gpu_machines_packages(tmp_path: Path) -> None:
    out = _dry_run(tmp_path, "-c", BARE)
    assert re.search(r"LoRA, DDP path, bf16 autocast .*: \d[\d,]* tokens/s, MFU n/a", out), out
    assert re.search(r"bf16 autocast vs float32.*\(agree within 1 %\)", out), out
    assert re.search(r"serving \(transformers engine, bf16.*batch 16: \d[\d,]* tokens/s", out), out
    ran, untested = out.split("untested here: ", 1)
    assert "ZeRO-3" not in ran and "QLoRA (" not in ran
    assert "DeepSpeed ZeRO (DeepSpeed is not installed)" in untested
    assert "QLoRA (bitsandbytes is not installed)" in untested
    assert "FAILED" not in out
