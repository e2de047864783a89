"""bench/synthetic_data.py's --quick mode: both runs finish on the real models and the
figures it prints agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The bench starts a private Ray cluster of its own (tests/conftest.py: the Ray part).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_ray]


def test_quick_synthetic_data_bench_prints_consistent_figures() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "RAY_ADDRESS"))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "synthetic_data.py"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    [line] = [line for line in out.splitlines() if line.startswith("RESULT ")]
    figures = json.loads(line.removeprefix("RESULT "))
    stats = figures["pipeline"]["statistics"]
    assert (stats["prompts"], stats["generated"], stats["kept"]) == (4, 8, 4)  # top_k 1 of 2
    for run in ("sequential", "pipeline"):
        assert figures[run]["prompts_per_s"] == pytest.approx(4 / figures[run]["wall_s"])
    assert figures["ratio"] == pytest.approx(
        figures["pipeline"]["prompts_per_s"] / figures["sequential"]["prompts_per_s"]
    )
    assert f"ratio {figures['ratio']:.2f}x" in out
