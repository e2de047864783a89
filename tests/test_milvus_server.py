"""The embedded `milvus-lite server`: started when absent, found again (by another object,
another process), loopback only, restarted after it died, stopped by its own pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from corral.config import Settings
from corral.milvus_client import open_client
from corral.milvus_server import LocalMilvus, MilvusServerInfo, milvus_uri_for

REPO_ROOT = Path(__file__).resolve().parents[1]


def _listen_hosts(port: int) -> set[str]:
    """Addresses a socket on `port` listens on, read from /proc/net/tcp{,6}."""
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


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _wait_dead(pid: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


@pytest.fixture
def local(tmp_path: Path) -> LocalMilvus:
    server = LocalMilvus(tmp_path)
    yield server
    server.stop()


def test_ensure_starts_a_server_when_absent_and_records_it(local: LocalMilvus) -> None:
    assert local.running() is None
    started = time.monotonic()
    uri = local.ensure()
    elapsed = time.monotonic() - started
    info = local.running()
    assert info is not None and info.uri == uri
    assert uri == f"http://127.0.0.1:{info.port}"
    assert MilvusServerInfo.from_json(local.record_path.read_text()) == info
    assert info.data_dir == local.data_dir and (local.data_dir / "LOCK").exists()
    assert os.getpgid(info.pid) == info.pid  # its own session: it outlives this process
    assert os.getsid(info.pid) == info.pid
    assert local.log_path.exists()
    assert oct(local.milvus_dir.stat().st_mode & 0o777) == "0o700"
    client = open_client(uri)
    try:
        assert client.list_collections() == []
    finally:
        client.close()
    print(f"milvus-lite server ready in {elapsed:.2f}s")  # a figure for the report


@pytest.mark.slow
def test_an_idle_client_is_not_sent_away_for_pinging_too_often(local: LocalMilvus) -> None:
    """With pymilvus's own keepalive (a ping every 10 s) this server answers a client left
    idle for 90 s with GOAWAY too_many_pings, a line gRPC logs at ERROR (checked by hand
    with `MilvusClient(uri=...)` in place of open_client); after it the process's shared
    channel could not reconnect and every client failed (CI, milvus-lite issue 334). In a
    process of its own, so that no other client's channel is the one shared."""
    uri = local.ensure()
    script = textwrap.dedent(
        f"""
        import time
        from corral.milvus_client import open_client
        client = open_client({uri!r}, timeout_s=30)
        print(client.list_collections())
        time.sleep(90)
        print(client.list_collections())
        print(open_client({uri!r}, timeout_s=30).list_collections())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": f"{REPO_ROOT / 'platform'}:{REPO_ROOT}",
            "GRPC_VERBOSITY": "ERROR",  # gRPC's default, where the GOAWAY is logged
        },
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[]", "[]", "[]"]
    assert "too_many_pings" not in done.stderr, done.stderr[-2000:]


def test_a_second_object_and_a_later_process_find_the_same_server(local: LocalMilvus) -> None:
    uri = local.ensure()
    pid = local.running().pid  # type: ignore[union-attr]
    again = LocalMilvus(local.home)
    assert again.ensure() == uri
    assert again.running().pid == pid  # type: ignore[union-attr]
    del again
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from corral.milvus_server import LocalMilvus
        print(LocalMilvus(Path({str(local.home)!r})).ensure())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'platform'}:{REPO_ROOT}"},
        timeout=60,
    ).stdout.strip()
    assert out == uri
    assert local.running().pid == pid  # type: ignore[union-attr]


def test_the_server_listens_on_loopback_only(local: LocalMilvus) -> None:
    local.ensure()
    info = local.running()
    assert info is not None
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    hosts = _listen_hosts(info.port)
    assert hosts, "nothing listens on the recorded port"
    assert hosts <= {"127.0.0.1", "::ffff:127.0.0.1"}, hosts


def test_a_killed_server_is_restarted_with_its_data(local: LocalMilvus) -> None:
    uri = local.ensure()
    client = open_client(uri)
    client.create_collection("kept", dimension=4)
    client.close()
    old = local.running()
    assert old is not None
    os.kill(old.pid, signal.SIGKILL)  # the server this test started, by its own pid
    _wait_dead(old.pid)
    assert local.running() is None
    assert not local.record_path.exists()
    new_uri = local.ensure()
    new = local.running()
    assert new is not None and new.pid != old.pid
    client = open_client(new_uri)
    try:
        assert "kept" in client.list_collections()
    finally:
        client.close()


def test_stop_stops_the_recorded_server(local: LocalMilvus) -> None:
    local.ensure()
    info = local.running()
    assert info is not None
    assert local.stop() is True
    _wait_dead(info.pid)
    assert not local.record_path.exists()
    assert local.running() is None
    assert local.stop() is False
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", info.port)) != 0


def test_a_record_of_a_live_process_that_is_not_the_server_is_stale(tmp_path: Path) -> None:
    # A live child, in this process's group: its pid leads no group (pytest's own pid may,
    # when it was started as a session leader, and a live group is not stale).
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        local = LocalMilvus(tmp_path)
        local.milvus_dir.mkdir(parents=True)
        local.record_path.write_text(
            MilvusServerInfo(
                uri="http://127.0.0.1:1", pid=other.pid, port=1, data_dir=local.data_dir
            ).to_json()
        )
        assert local.running() is None
        assert not local.record_path.exists()
    finally:
        other.kill()
        other.wait()


def test_an_unreadable_record_is_removed(tmp_path: Path) -> None:
    local = LocalMilvus(tmp_path)
    local.milvus_dir.mkdir(parents=True)
    local.record_path.write_text("{not json")
    assert local.running() is None
    assert not local.record_path.exists()


def test_a_configured_uri_is_used_and_nothing_starts(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, milvus_uri="http://milvus.example:19530", milvus_token="t")
    assert milvus_uri_for(settings) == ("http://milvus.example:19530", "t")
    assert not (tmp_path / "milvus").exists()
