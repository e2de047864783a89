"""The README's main command, end to end: `corral demo` builds the demo model, starts
`corral serve` (which starts the embedded Ray head), and runs its scripted session.
Then the Ray head outlives the API server, and a restarted server reconnects to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from corral.demo import listening_socket, serve_command
from corral.ray_cluster import LocalRayHead

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env(home: Path) -> dict[str, str]:
    env = os.environ | {"CORRAL_HOME": str(home)}
    for name in ("CORRAL_API_KEYS", "CORRAL_DATABASE_URL", "RAY_ADDRESS"):
        env.pop(name, None)
    return env


def test_demo_then_restart_reconnects_to_the_same_ray_head(embedded_home: Path) -> None:
    home = embedded_home
    demo = subprocess.run(
        [sys.executable, "-m", "corral.cli", "demo", "--keep-ray"],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    log = (home / "demo-server.log").read_text() if (home / "demo-server.log").exists() else ""
    assert demo.returncode == 0, demo.stdout + demo.stderr + log
    assert "Demo finished" in demo.stdout
    assert "FAIL" not in demo.stdout

    # The API server is gone; the Ray head it started is not.
    head = LocalRayHead(home).find()
    assert head is not None

    # The port stays bound from here: the server inherits the socket (no race for it).
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        server = subprocess.Popen(
            serve_command(sock),
            env=_env(home),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(sock.fileno(),),
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "corral serve exited early"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "corral serve did not come up"
            time.sleep(0.5)
        again = LocalRayHead(home).find()
        assert again is not None
        assert (again.pid, again.address) == (head.pid, head.address)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
