"""The Milvus that memory banks live in: a server by URI, or an embedded `milvus-lite server`.

Milvus Lite opens its data directory for one process only (an ``flock`` on ``data/LOCK``),
and the API, Serve replicas and Ray jobs are separate processes, so in the embedded default
(no ``CORRAL_MILVUS_URI``) it runs as a server process of its own, supervised like the
embedded Ray head (corral.ray_cluster): started in a new session so it outlives the API
process, recorded under ``CORRAL_HOME/milvus/`` and found again by the next process.
Files under ``CORRAL_HOME/milvus/``:

- ``server.json``: the running server (uri, pid, port, data dir), replaced atomically.
- ``lock``: ``flock``-ed while finding, starting or stopping, so two callers never race.
- ``server.log``: stdout/stderr of ``milvus-lite server``.
- ``data/``: Milvus Lite's data directory.

Security: Milvus Lite has no authentication, so the server binds ``127.0.0.1`` only (its
own default is ``0.0.0.0``); any local process can still read and write it. Production
deployments set ``CORRAL_MILVUS_URI`` and ``CORRAL_MILVUS_TOKEN`` to a Milvus server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corral.ray_cluster import (
    _free_ports,
    _group_alive,
    _make_private_dir,
    _port_open,
    _proc_stat,
    _signal,
    _tail,
    _wait_until,
    _write_atomically,
)

if TYPE_CHECKING:
    from corral.config import Settings

HOST = "127.0.0.1"


class MilvusServerError(RuntimeError):
    """The embedded Milvus Lite server could not be started or is in an unexpected state."""


@dataclass(frozen=True)
class MilvusServerInfo:
    """A running embedded Milvus Lite server, as recorded in ``server.json``."""

    uri: str  # http://127.0.0.1:PORT, for pymilvus.MilvusClient(uri=...)
    pid: int  # the `milvus-lite server` process; it leads its own process group
    port: int
    data_dir: Path

    def to_json(self) -> str:
        return json.dumps(
            {"uri": self.uri, "pid": self.pid, "port": self.port, "data_dir": str(self.data_dir)}
        )

    @classmethod
    def from_json(cls, text: str) -> MilvusServerInfo:
        data = json.loads(text)
        return cls(
            uri=str(data["uri"]),
            pid=int(data["pid"]),
            port=int(data["port"]),
            data_dir=Path(data["data_dir"]),
        )


class LocalMilvus:
    """Starts, finds and stops the embedded Milvus Lite server recorded under `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home.expanduser().resolve()
        self.milvus_dir = self.home / "milvus"
        self.record_path = self.milvus_dir / "server.json"
        self.lock_path = self.milvus_dir / "lock"
        self.log_path = self.milvus_dir / "server.log"
        self.data_dir = self.milvus_dir / "data"

    def running(self) -> MilvusServerInfo | None:
        """The recorded server if it is alive and answers; a stale record is removed."""
        with self._locked():
            return self._find_locked()

    def ensure(self, *, timeout_s: float = 60) -> str:
        """The running server's URI, started first if there is none."""
        with self._locked():
            info = self._find_locked()
            return (info if info is not None else self._start_locked(timeout_s)).uri

    def stop(self, *, timeout_s: float = 15) -> bool:
        """Stop the recorded server (by its recorded pid's process group, never by name)
        and remove its record; True if something was stopped."""
        with self._locked():
            return self._stop_locked(timeout_s)

    # -- internals, called with the lock held --------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        _make_private_dir(self.milvus_dir)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _read_record(self) -> MilvusServerInfo | None:
        try:
            return MilvusServerInfo.from_json(self.record_path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            self.record_path.unlink(missing_ok=True)  # unreadable: nothing to find there
            return None

    def _find_locked(self) -> MilvusServerInfo | None:
        info = self._read_record()
        if info is None:
            return None
        running = _is_server_process(info)
        if running and _milvus_answers(info.uri):
            return info
        if not running and not _group_alive(info.pid):
            self.record_path.unlink(missing_ok=True)
        return None

    def _stop_locked(self, timeout_s: float) -> bool:
        info = self._read_record()
        if info is None:
            return False
        stopped = False
        if _is_server_process(info) or _group_alive(info.pid):
            # SIGINT is what `milvus-lite server` shuts down cleanly on: it drains requests
            # and closes the data directory (SIGTERM would kill it mid-write).
            stopped = _signal(info.pid, signal.SIGINT, group=True)
        if not _wait_until(lambda: not _group_alive(info.pid), timeout_s) and _signal(
            info.pid, signal.SIGKILL, group=True
        ):
            stopped = True
            _wait_until(lambda: not _group_alive(info.pid), 5)
        self.record_path.unlink(missing_ok=True)
        return stopped

    def _start_locked(self, timeout_s: float) -> MilvusServerInfo:
        self._stop_locked(timeout_s=15)  # what is left of a recorded server that stopped working
        _make_private_dir(self.data_dir)
        (port,) = _free_ports(1)
        command = [
            milvus_lite_binary(),
            "server",
            "--data-dir",
            str(self.data_dir),
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n".encode())
            log.flush()
            process = subprocess.Popen(  # noqa: S603 - fixed command, no user input
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Reap it if it exits while this process lives, so it never lingers as a zombie.
        threading.Thread(target=process.wait, name=f"milvus-{process.pid}", daemon=True).start()
        uri = f"http://{HOST}:{port}"

        def ready() -> bool:
            if process.poll() is not None:
                raise MilvusServerError(
                    f"`milvus-lite server` exited with {process.returncode}; see "
                    f"{self.log_path}:\n" + _tail(self.log_path)
                )
            return _port_open(f"{HOST}:{port}") and _milvus_answers(uri)

        try:
            if not _wait_until(ready, timeout_s):
                raise MilvusServerError(
                    f"Milvus Lite not ready after {timeout_s:.0f}s; see {self.log_path}:\n"
                    + _tail(self.log_path)
                )
        except BaseException:
            _signal(process.pid, signal.SIGKILL, group=True)
            raise
        info = MilvusServerInfo(uri=uri, pid=process.pid, port=port, data_dir=self.data_dir)
        _write_atomically(self.record_path, info.to_json())
        return info


def milvus_uri_for(settings: Settings) -> tuple[str, str | None]:
    """(uri, token) of the Milvus that memory banks use: the configured server, or the
    embedded one under ``settings.home`` (started if needed; it has no token)."""
    if settings.milvus_uri:
        return settings.milvus_uri, settings.milvus_token or None
    return LocalMilvus(settings.home).ensure(), None


def milvus_lite_binary() -> str:
    """`milvus-lite` beside this interpreter (its virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / "milvus-lite"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("milvus-lite")
    if found is None:
        raise MilvusServerError(
            "the `milvus-lite` command was not found (pip install milvus-lite), "
            "or set CORRAL_MILVUS_URI to a Milvus server"
        )
    return found


def _is_server_process(info: MilvusServerInfo) -> bool:
    """Whether info.pid is still our server: alive, leading its group, same data dir."""
    try:
        os.kill(info.pid, 0)
        if os.getpgid(info.pid) != info.pid:
            return False
    except OSError:
        return False
    if not Path("/proc").is_dir():
        return True
    proc = _proc_stat(info.pid)
    if proc is None or proc[0] == "Z":
        return False
    try:
        argv = Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"server" in argv and str(info.data_dir).encode() in argv


def _milvus_answers(uri: str, timeout_s: float = 3) -> bool:
    """A real request through pymilvus: the port being open is not enough (another program
    may have taken it after our server died)."""
    from pymilvus.exceptions import MilvusException

    from corral.milvus_client import open_client

    try:
        client = open_client(uri, timeout_s=timeout_s)
    except (MilvusException, OSError):
        return False
    try:
        client.list_collections(timeout=timeout_s)
        return True
    except (MilvusException, OSError):
        return False
    finally:
        client.close()
