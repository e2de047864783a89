"""API process benchmark: how long a fresh Corral API process takes to answer its first
request and how much memory it holds then, against a bare FastAPI app served the same way
in the same run (the floor any Python web process pays).

    python bench/api_process.py [--runs 3]

Each run starts a new Python process that imports the app, builds it on an empty SQLite
store (no Ray connection: what is measured is the API process itself, not Ray or a
model), serves it with uvicorn on a loopback socket and answers one `GET /health`. The
time is from process start to that answer; the memory is the process's resident set
(VmRSS) right after it, and the process says which heavy libraries it had imported."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HEAVY = ("torch", "transformers", "peft")

# The child: builds the app named by argv[1] ("corral" or "bare"), serves it on the
# inherited socket argv[2], and reports its memory and modules when /stats is asked.
CHILD = r"""
import sys, socket, json
kind, fd, home = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import uvicorn
from fastapi import FastAPI
if kind == "corral":
    from corral.app import create_app
    from corral.config import Settings
    from corral.store import migrate
    settings = Settings(home=home)
    migrate.upgrade(settings.resolved_database_url)
    app = create_app(settings)
else:
    app = FastAPI()
    @app.get("/health")
    def health():
        return {"status": "ok"}

@app.get("/bench-stats", include_in_schema=False)
def stats():
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
    heavy = [m for m in ("torch", "transformers", "peft") if m in sys.modules]
    return {"rss_kib": rss, "heavy": heavy}

listener = socket.socket(fileno=fd)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
"""


@dataclass(frozen=True)
class Sample:
    ready_s: float
    rss_mib: float
    heavy: list[str]


def measure(kind: str, home: Path) -> Sample:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    started = time.perf_counter()
    process = subprocess.Popen(  # our own interpreter, fixed arguments
        [sys.executable, "-c", CHILD, kind, str(listener.fileno()), str(home)],
        pass_fds=[listener.fileno()],
        env={**os.environ, "CORRAL_HOME": str(home)},
    )
    listener.close()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    raise RuntimeError(f"the {kind} process exited with {process.returncode}")
                time.sleep(0.02)
            ready_s = time.perf_counter() - started
            stats = client.get("/bench-stats").json()
    finally:
        process.terminate()
        process.wait(timeout=30)
    return Sample(ready_s=ready_s, rss_mib=stats["rss_kib"] / 1024, heavy=stats["heavy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[Sample]] = {"bare": [], "corral": []}
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        for run in range(args.runs):
            for kind in results:  # interleaved, so a busy moment hits both alike
                results[kind].append(measure(kind, Path(tmp) / f"{kind}-{run}"))
    ready = {kind: statistics.median(s.ready_s for s in runs) for kind, runs in results.items()}
    rss = {kind: statistics.median(s.rss_mib for s in runs) for kind, runs in results.items()}
    heavy = sorted({module for sample in results["corral"] for module in sample.heavy})
    print(json.dumps({"ready_s_median": ready, "rss_mib_median": rss, "heavy_modules": heavy}))
    print(
        f"Corral API process: ready in {ready['corral']:.2f} s "
        f"({ready['corral'] / ready['bare']:.1f}x a bare FastAPI app), "
        f"{rss['corral']:.0f} MiB resident ({rss['corral'] / rss['bare']:.1f}x); "
        f"heavy modules loaded: {', '.join(heavy) or 'none'}"
    )


if __name__ == "__main__":
    main()
