"""The embedded Ray head: started once, found again, reachable from other processes, stopped.

One real head serves the whole module. The pytest process never calls ray.init (other
tests share an in-process cluster); client checks run in subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.ray_cluster import (
    MAX_TEMP_DIR_CHARS,
    LocalRayHead,
    RayHead,
    RayHeadError,
    connect,
    ray_temp_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every test here starts (or finds) an embedded Ray head of its own (tests/conftest.py).
pytestmark = pytest.mark.own_ray


@dataclass(frozen=True)
class Embedded:
    local: LocalRayHead
    head: RayHead
    user_home: Path  # HOME the head was started with: must stay free of ~/.ray


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    home = tmp_path_factory.mktemp("corral-home")
    user_home = tmp_path_factory.mktemp("user-home")
    local = LocalRayHead(home, num_cpus=1)
    head: RayHead | None = None
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", str(user_home))
            for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
                mp.delenv(name, raising=False)
            head = local.ensure(timeout_s=120)
        yield Embedded(local=local, head=head, user_home=user_home)
    finally:
        local.stop()
        if head is not None:
            # Whatever stop() left behind, by the pid we launched.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            if head.temp_dir.name.startswith("corral-ray-"):
                shutil.rmtree(head.temp_dir, ignore_errors=True)


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _run_python(code: str, *, env: dict[str, str]) -> dict[str, object]:
    """Run `code` in a fresh interpreter; it prints one JSON line last."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "HOME"}
    base["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT / "platform"), os.environ.get("PYTHONPATH", "")]
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**base, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.integration
@pytest.mark.slow
def test_ensure_starts_a_head_in_its_own_session_and_records_it(embedded: Embedded) -> None:
    head, local = embedded.head, embedded.local
    assert RayHead.from_json(local.record_path.read_text()) == head
    assert _port_open(head.address)
    assert os.getsid(head.pid) == head.pid  # its own session: outlives the caller
    assert os.getpgid(head.pid) == head.pid
    assert stat.S_IMODE(local.token_path.stat().st_mode) == 0o600
    assert len(str(head.temp_dir)) <= MAX_TEMP_DIR_CHARS
    assert not (embedded.user_home / ".ray").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_another_instance_finds_the_same_head(embedded: Embedded) -> None:
    home = embedded.local.home
    assert LocalRayHead(home).find() == embedded.head

    found: list[RayHead] = []
    threads = [
        threading.Thread(target=lambda: found.append(LocalRayHead(home).ensure())) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [h.pid for h in found] == [embedded.head.pid] * 2


@pytest.mark.integration
@pytest.mark.slow
def test_a_client_process_with_the_auth_env_runs_a_task_and_lists_jobs(
    embedded: Embedded,
) -> None:
    head = embedded.head
    result = _run_python(
        f"""
        import json, ray
        from ray.job_submission import JobSubmissionClient

        ray.init(address={head.address!r}, log_to_driver=False)
        task = ray.remote(lambda x: x + 1)
        answer = ray.get(task.remote(41))
        jobs = JobSubmissionClient({head.dashboard_url!r}).list_jobs()
        ray.shutdown()
        print(json.dumps({{"answer": answer, "jobs_listed": isinstance(jobs, list)}}))
        """,
        env={"HOME": str(embedded.user_home), **embedded.local.auth_env()},
    )
    assert result == {"answer": 42, "jobs_listed": True}
    assert not (embedded.user_home / ".ray").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_connect_from_a_fresh_process_without_home_reuses_the_head(
    embedded: Embedded,
) -> None:
    head = embedded.head
    result = _run_python(
        f"""
        import json
        from pathlib import Path
        import ray  # configured before connect() switches it to token mode
        from ray.job_submission import JobSubmissionClient
        from corral.ray_cluster import connect

        head = connect(address=None, home=Path({str(embedded.local.home)!r}))
        task = ray.remote(lambda: ray.get_runtime_context().namespace)
        namespace = ray.get(task.remote())
        jobs = JobSubmissionClient(head.dashboard_url).list_jobs()
        ray.shutdown()
        listed = isinstance(jobs, list)
        print(json.dumps({{"pid": head.pid, "namespace": namespace, "jobs_listed": listed}}))
        """,
        env={},  # no HOME, no RAY_* variables
    )
    assert result == {"pid": head.pid, "namespace": "corral", "jobs_listed": True}


def _listen_hosts(port: int) -> set[str]:
    hosts: set[str] = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            host_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(host_hex)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            hosts.add(socket.inet_ntop(family, raw))
    return hosts


@pytest.mark.integration
@pytest.mark.slow
def test_the_dashboard_listens_on_loopback_only(embedded: Embedded) -> None:
    url = embedded.head.dashboard_url
    assert url.startswith("http://127.0.0.1:")
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    assert _listen_hosts(int(url.rpartition(":")[2])) == {"127.0.0.1"}


@pytest.mark.integration
@pytest.mark.slow
def test_stop_stops_the_whole_head(embedded: Embedded) -> None:
    head, local = embedded.head, embedded.local
    assert local.stop() is True
    assert not _port_open(head.address)
    assert not local.record_path.exists()
    assert local.find() is None
    assert local.stop() is False
    table = subprocess.run(
        ["ps", "-e", "-o", "pgid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    left = [row for row in table if row.split()[0] == str(head.pid) and row.split()[1][0] != "Z"]
    assert left == []


# -- without Ray ---------------------------------------------------------------------------


def _record(home: Path, head: RayHead) -> Path:
    path = home / "ray" / "head.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head.to_json())
    return path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_a_record_of_a_dead_pid_is_stale_and_removed(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    local = LocalRayHead(tmp_path)
    path = _record(
        tmp_path,
        RayHead(
            address=f"127.0.0.1:{_closed_port()}",
            dashboard_url="http://127.0.0.1:1",
            pid=gone.pid,
            temp_dir=local.temp_dir,
        ),
    )
    assert local.find() is None
    assert not path.exists()
    assert local.stop() is False


def test_a_record_of_a_live_process_that_is_not_the_head_is_stale(tmp_path: Path) -> None:
    local = LocalRayHead(tmp_path)
    path = _record(
        tmp_path,
        RayHead(
            address=f"127.0.0.1:{_closed_port()}",
            dashboard_url="http://127.0.0.1:1",
            pid=os.getpid(),
            temp_dir=local.temp_dir,
        ),
    )
    assert local.find() is None
    assert not path.exists()


def test_a_head_whose_gcs_is_gone_is_kept_for_stop_not_orphaned(tmp_path: Path) -> None:
    local = LocalRayHead(tmp_path)
    # Looks like our `ray start` to find(): a group leader with our --temp-dir argument.
    impostor = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", f"--temp-dir={local.temp_dir}"],
        start_new_session=True,
    )
    try:
        path = _record(
            tmp_path,
            RayHead(
                address=f"127.0.0.1:{_closed_port()}",
                dashboard_url="http://127.0.0.1:1",
                pid=impostor.pid,
                temp_dir=local.temp_dir,
            ),
        )
        assert local.find() is None
        assert path.exists()
        assert local.stop(timeout_s=10) is True
        assert impostor.wait(timeout=10) == -signal.SIGTERM
        assert not path.exists()
    finally:
        impostor.kill()
        impostor.wait()


def test_an_unreadable_record_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "ray" / "head.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert LocalRayHead(tmp_path).find() is None
    assert not path.exists()


def test_the_temp_dir_stays_short_enough_for_ray_sockets(tmp_path: Path) -> None:
    assert ray_temp_dir(Path("/srv/corral")) == Path("/srv/corral/ray/tmp")
    long_home = tmp_path / ("x" * 60)
    fallback = ray_temp_dir(long_home)
    assert fallback.parent == Path("/tmp")
    assert fallback.name.startswith("corral-ray-")
    assert len(str(fallback)) <= MAX_TEMP_DIR_CHARS
    assert ray_temp_dir(long_home) == fallback
    assert ray_temp_dir(tmp_path / ("y" * 60)) != fallback


def test_connect_refuses_an_embedded_head_while_ray_address_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(RayHeadError, match="RAY_ADDRESS"):
        connect(address=None, home=tmp_path)
    assert not (tmp_path / "ray" / "head.json").exists()
