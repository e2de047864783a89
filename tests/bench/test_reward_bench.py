"""bench/reward.py --quick: it runs, batches the pairs of one request, and the batched
scores equal the one-by-one scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The bench starts a private Ray cluster of its own (tests/conftest.py: the Ray part).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_ray]


def test_quick_reward_bench_batches_and_agrees() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "reward.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    figures = json.loads(line.removeprefix("RESULT "))
    assert figures["pairs"] == 8
    assert figures["largest_batch"] > 1
    assert figures["batched_pairs_per_s"] > 0 and figures["sequential_pairs_per_s"] > 0
    assert figures["max_score_difference"] < 1e-5
