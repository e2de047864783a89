"""bench/load.py's --quick mode against a real `corral serve` (its own Ray head): the
figures it prints are sane, and past the queue bound requests are refused fast with
Retry-After, while the ones within it are answered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _sane_latencies(figures: dict[str, Any]) -> None:
    assert 0 < figures["p50_s"] <= figures["p95_s"] <= figures["p99_s"] <= figures["max_s"]


def test_quick_load_prints_sane_figures_and_refuses_past_the_bound_fast(
    embedded_home: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "RAY_ADDRESS"))}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "load.py"),
            "--quick",
            "--home",
            str(embedded_home),
            "--concurrency",
            "2",
            "--queue-bound",
            "2",
            "--max-batch-size",
            "2",
        ],
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

    load = figures["load"]
    assert load["requests"] > 0 and load["failures"] == 0 and load["refused"] == 0, load
    assert load["ok"] == load["requests"]
    assert load["throughput_rps"] == pytest.approx(load["ok"] / load["elapsed_s"])
    _sane_latencies(load["latency"])
    assert f"load: {load['elapsed_s']:.1f} s at concurrency 2: {load['requests']} requests" in out

    overload = figures["overload"]
    assert overload["failures"] == 0, overload
    assert overload["ok"] > 0  # within the bound requests are still served ...
    assert overload["refused"] > 0  # ... and past it they are refused,
    assert overload["refused_with_retry_after"] == overload["refused"]  # saying when to retry,
    _sane_latencies(overload["latency"])
    refusals = overload["refusal_latency"]
    _sane_latencies(refusals)
    # ... at once: a refusal does not wait for the replica the way an answer does.
    assert refusals["p50_s"] < overload["latency"]["p50_s"], overload
    assert refusals["p95_s"] < 1.0, overload
    assert "refusal latency p50" in out
