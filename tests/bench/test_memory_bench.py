"""bench/memory.py --quick: it runs Corral's memory bank API and pymilvus by hand on the
same data, and its figures are consistent: both find the same documents, ratios are the
ratios of the printed throughputs, latencies are ordered."""

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


def test_quick_memory_bench_prints_consistent_figures() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "RAY_ADDRESS"))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory.py"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    [line] = [line for line in out.splitlines() if line.startswith("RESULT ")]
    figures = json.loads(line.removeprefix("RESULT "))
    assert figures["documents"] == 12 and figures["chunks"] >= 2 * figures["documents"]
    corral, raw = figures["corral"], figures["raw_pymilvus"]
    for run in (corral, raw, figures["milvus_alone"]):
        assert run["documents_per_s"] > 0 and run["queries_per_s"] > 0
        assert 0 < run["p50_ms"] <= run["p99_ms"]
    # same chunks, same embeddings, same search: the same recall on the same questions
    # (the recall aim itself is tested on the whole corpus: tests/memory/test_recall.py)
    assert corral["recall_at_3"] >= 0.75 and raw["recall_at_3"] >= 0.75
    assert abs(corral["recall_at_3"] - raw["recall_at_3"]) <= 1 / figures["questions"]  # ties
    assert figures["insert_ratio"] == pytest.approx(
        corral["documents_per_s"] / raw["documents_per_s"]
    )
    assert figures["query_ratio"] == pytest.approx(corral["queries_per_s"] / raw["queries_per_s"])
    assert f"insert {figures['insert_ratio']:.2f}x, query {figures['query_ratio']:.2f}x" in out
