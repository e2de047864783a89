"""bench/gpu_check.py is run by hand on a GPU; its --dry-run runs the same checks on the CPU
at tiny shapes, so the script cannot rot unnoticed between GPU runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_dry_run_prints_every_figure(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run"],
        cwd=tmp_path,
        env=os.environ | {"TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"ZeRO-3 \+ LoRA, bf16, .*: \d[\d,]* tokens/s, MFU n/a", out), out
    assert re.search(r"QLoRA \(Linear4bit, NF4\).*loss [\d.]+ -> [\d.]+ \(falls\)", out), out
    assert re.search(r"bf16 autocast vs float32.*\(agree within 1 %\)", out), out
    assert "FAILED" not in out
