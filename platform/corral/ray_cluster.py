"""The Ray cluster Corral runs on: join a given one, or keep an embedded local head alive.

Jobs must outlive the API server (ARCHITECTURE decision 3), so in the embedded default
(no ``RAY_ADDRESS``) Ray runs as its own process group, started with ``ray start --head
--block`` in a new session, recorded in ``CORRAL_HOME/ray/head.json`` and found again by
the next API process. Files under ``CORRAL_HOME/ray/``:

- ``head.json``: the running head (address, dashboard URL, pid, temp dir), replaced atomically.
- ``lock``: ``flock``-ed while finding, starting or stopping, so two callers never race.
- ``auth_token``: the head's token (mode 0600), kept across restarts.
- ``head.log``: stdout/stderr of ``ray start``; Ray's own logs are in the temp dir.
- ``tmp/``: Ray's ``--temp-dir``. Ray puts unix sockets at
  ``<temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store``, and AF_UNIX paths are
  limited to 107 bytes, so when ``CORRAL_HOME/ray/tmp`` is longer than 40 characters the
  temp dir is ``/tmp/corral-ray-<sha256(home)[:12]>`` instead (mode 0700, owner checked).

Token authentication, as Ray 2.60 does it (read from its source and checked on a live head):

- A token comes from, in order: ``RAY_AUTH_TOKEN`` (the value), ``RAY_AUTH_TOKEN_PATH`` (a
  file), ``~/.ray/auth_token``. The mode comes from ``RAY_AUTH_MODE`` (``token`` or
  ``disabled``), which each process reads once into its C++ config.
- ``ray.init()`` with no address starts a new cluster with token mode on by default and
  writes ``~/.ray/auth_token`` if no token exists.
- ``ray start --head`` never creates a token: with ``RAY_AUTH_MODE`` unset it turns token
  mode on only if a token already exists (e.g. a ``~/.ray/auth_token`` left by an earlier
  ``ray.init()``), and otherwise starts without authentication.
- ``ray.init(address=host:port)`` (an explicit address, or ``RAY_ADDRESS``) never turns token
  mode on by itself: unless ``RAY_AUTH_MODE=token`` is set the client sends no token and a
  token head refuses it (``AuthenticationError`` after ~20 s of retries). HTTP clients of
  the dashboard (``JobSubmissionClient``) likewise send ``Authorization: Bearer`` only in
  token mode; without it the Jobs API answers 401.
- The GCS and raylet listen on all interfaces (Ray maps ``--node-ip-address=127.0.0.1`` to
  the machine's address), so the token is what keeps the embedded head private; only the
  dashboard can be bound to loopback.

So Corral pins it down instead of depending on whatever ``~/.ray`` holds: the embedded head
runs with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH=CORRAL_HOME/ray/auth_token``
(``RAY_AUTH_TOKEN`` removed), and ``connect`` puts the same variables into ``os.environ`` of
the API process (Ray has no other way to take them) before ``ray.init``. ``~/.ray`` is never
read or written, so this works with a fresh or missing ``HOME``. Other processes that talk to
the embedded head need ``LocalRayHead(home).auth_env()`` in their environment; Ray jobs and
workers inherit it from the head. With ``RAY_ADDRESS`` the cluster's auth is its owner's
business: set ``RAY_AUTH_MODE=token`` and a token source for a token cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import importlib
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"  # noqa: S105 - a variable name, not a secret
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"  # noqa: S105 - a variable name, not a secret
# The API server's secrets, which the embedded head (and so every Ray job and replica it
# runs) must not inherit from `corral serve`: jobs report with their own token
# (docs/job_credentials.md), never with the store's URL or the keys.
SERVER_SECRET_ENV = frozenset(
    {
        "CORRAL_DATABASE_URL",
        "CORRAL_JOB_TOKEN_SECRET",
        "CORRAL_API_KEYS",
        "CORRAL_OPERATOR_KEYS",
        "CORRAL_MILVUS_TOKEN",
        "CORRAL_WEB_SEARCH_API_KEY",
        "CORRAL_IMAGE_GEN_API_KEY",
    }
)
RAY_ADDRESS_ENV = "RAY_ADDRESS"
NAMESPACE = "corral"

# Room left for Ray's "/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store.N" (~66
# bytes with a 7-digit pid) under the 107-byte AF_UNIX limit.
MAX_TEMP_DIR_CHARS = 40
_POLL_S = 0.2


class RayHeadError(RuntimeError):
    """The embedded Ray head could not be started or is in an unexpected state."""


@dataclass(frozen=True)
class RayHead:
    """A running embedded Ray head, as recorded in ``head.json``."""

    address: str  # GCS address host:port, for ray.init(address=...)
    dashboard_url: str  # http://127.0.0.1:PORT, for the Ray Jobs SDK
    pid: int  # the `ray start --block` process; its process group is the head
    temp_dir: Path

    def to_json(self) -> str:
        return json.dumps(
            {
                "address": self.address,
                "dashboard_url": self.dashboard_url,
                "pid": self.pid,
                "temp_dir": str(self.temp_dir),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> RayHead:
        data = json.loads(text)
        return cls(
            address=str(data["address"]),
            dashboard_url=str(data["dashboard_url"]),
            pid=int(data["pid"]),
            temp_dir=Path(data["temp_dir"]),
        )


class LocalRayHead:
    """Starts, finds and stops the embedded Ray head recorded under `home`."""

    def __init__(
        self, home: Path, *, num_cpus: int | None = None, num_gpus: int | None = None
    ) -> None:
        self.home = home.expanduser().resolve()
        # Logical CPUs are scheduling slots, not cores: a fine-tuning job's two workers (one
        # slot each) must fit beside the demo model's replica even on a two-core laptop.
        self.num_cpus = num_cpus if num_cpus is not None else embedded_cpus()
        self.num_gpus = num_gpus
        self.ray_dir = self.home / "ray"
        self.record_path = self.ray_dir / "head.json"
        self.lock_path = self.ray_dir / "lock"
        self.token_path = self.ray_dir / "auth_token"
        self.log_path = self.ray_dir / "head.log"
        self.temp_dir = ray_temp_dir(self.home)

    def auth_env(self) -> dict[str, str]:
        """Environment variables a Ray client process needs to talk to this head."""
        return {AUTH_MODE_ENV: "token", AUTH_TOKEN_PATH_ENV: str(self.token_path)}

    def find(self) -> RayHead | None:
        """The recorded head if it is alive (process and GCS port); a stale record is removed.

        A record whose processes still run but whose GCS does not answer is kept, so that
        ensure() and start() stop that head before starting another rather than orphan it.
        """
        with self._locked():
            return self._find_locked()

    def ensure(self, *, timeout_s: float = 60) -> RayHead:
        """The running head, started first if there is none."""
        with self._locked():
            head = self._find_locked()
            return head if head is not None else self._start_locked(timeout_s)

    def start(self, *, timeout_s: float = 60) -> RayHead:
        """Launch a new head; refuses if a working one is already recorded."""
        with self._locked():
            head = self._find_locked()
            if head is not None:
                raise RayHeadError(f"a Ray head is already running at {head.address}")
            return self._start_locked(timeout_s)

    def stop(self, *, timeout_s: float = 30) -> bool:
        """Stop the recorded head and remove its record; True if something was stopped."""
        with self._locked():
            return self._stop_locked(timeout_s)

    # -- internals, called with the lock held --------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        _make_private_dir(self.ray_dir)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _read_record(self) -> RayHead | None:
        try:
            return RayHead.from_json(self.record_path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            self.record_path.unlink(missing_ok=True)  # unreadable: nothing to find there
            return None

    def _find_locked(self) -> RayHead | None:
        head = self._read_record()
        if head is None:
            return None
        running = _is_head_process(head)
        if running and _port_open(head.address):
            return head
        if not running and not _group_alive(head.pid):
            self.record_path.unlink(missing_ok=True)
        return None

    def _stop_locked(self, timeout_s: float) -> bool:
        head = self._read_record()
        if head is None:
            return False
        stopped = False
        if _is_head_process(head):
            # The leader alone: `ray start` drains the node and then stops its children in
            # order. Signalling the whole group at once kills the GCS under it, and its
            # drain RPC then hangs for its whole timeout.
            stopped = _signal(head.pid, signal.SIGTERM, group=False)
        elif _group_alive(head.pid):
            stopped = _signal(head.pid, signal.SIGTERM, group=True)
        if not _wait_until(lambda: not _group_alive(head.pid), timeout_s) and _signal(
            head.pid, signal.SIGKILL, group=True
        ):
            stopped = True
            _wait_until(lambda: not _group_alive(head.pid), 5)
        self.record_path.unlink(missing_ok=True)
        return stopped

    def _start_locked(self, timeout_s: float) -> RayHead:
        self._stop_locked(timeout_s=30)  # what is left of a recorded head that stopped working
        _make_private_dir(self.temp_dir)
        _ensure_token(self.token_path)
        # `ray start` writes its GCS address here once every process is up; a leftover
        # file from an earlier head must not be mistaken for it.
        address_file = self.temp_dir / "ray_current_cluster"
        address_file.unlink(missing_ok=True)
        gcs_port, dashboard_port, client_port = _free_ports(3)
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            # Ray's fixed defaults (52365, 10001) would collide with any other head here.
            "--dashboard-agent-listen-port=0",
            f"--ray-client-server-port={client_port}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            "--log-style=record",
        ]
        if self.num_cpus is not None:
            command.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            command.append(f"--num-gpus={self.num_gpus}")
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n".encode())
            log.flush()
            process = subprocess.Popen(  # noqa: S603 - fixed command, no user input
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._head_env(),
                start_new_session=True,
            )
        # Reap it if it exits while this process lives, so it never lingers as a zombie.
        threading.Thread(target=process.wait, name=f"ray-head-{process.pid}", daemon=True).start()
        token = self.token_path.read_text().strip()

        def ready() -> bool:
            if process.poll() is not None:
                raise RayHeadError(
                    f"`ray start` exited with {process.returncode}; see {self.log_path}:\n"
                    + _tail(self.log_path)
                )
            if not address_file.exists():
                return False
            address = address_file.read_text().strip()
            return (
                bool(address) and _port_open(address) and _jobs_api_answers(dashboard_port, token)
            )

        try:
            if not _wait_until(ready, timeout_s):
                raise RayHeadError(
                    f"Ray head not ready after {timeout_s:.0f}s; see {self.log_path}:\n"
                    + _tail(self.log_path)
                )
        except BaseException:
            _signal(process.pid, signal.SIGKILL, group=True)
            raise
        head = RayHead(
            address=address_file.read_text().strip(),
            dashboard_url=f"http://127.0.0.1:{dashboard_port}",
            pid=process.pid,
            temp_dir=self.temp_dir,
        )
        _write_atomically(self.record_path, head.to_json())
        return head

    def _head_env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in (AUTH_TOKEN_ENV, RAY_ADDRESS_ENV) and key not in SERVER_SECRET_ENV
        }
        env.update(self.auth_env())
        # On SIGTERM `ray start` drains the node for up to 30 s; one embedded node has
        # nowhere to move work to, so keep that short and stop() predictable.
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "5")
        return env


def connect(*, address: str | None, home: Path) -> RayHead | str:
    """Join the cluster at `address`, or the embedded head under `home` (started if needed).

    Returns the address joined, or the embedded head. The embedded path points this
    process's Ray auth variables at the head's token (see the module docstring).
    """
    import ray

    if address is None and os.environ.get(RAY_ADDRESS_ENV):
        # Ray lets RAY_ADDRESS override the address argument of ray.init.
        raise RayHeadError(
            f"{RAY_ADDRESS_ENV} is set, but the embedded Ray head was asked for; "
            f"pass address={os.environ[RAY_ADDRESS_ENV]!r} or unset it"
        )
    if ray.is_initialized():
        raise RayHeadError("ray.init() was already called in this process")
    if address is not None:
        ray.init(
            address=address, namespace=NAMESPACE, ignore_reinit_error=False, log_to_driver=False
        )
        return address
    local = LocalRayHead(home)
    head = local.ensure()
    _use_token_auth(local.auth_env())
    ray.init(
        address=head.address, namespace=NAMESPACE, ignore_reinit_error=False, log_to_driver=False
    )
    return head


EMBEDDED_MIN_CPUS = 4


def embedded_cpus() -> int:
    """Logical CPUs of the embedded head: the machine's, and at least EMBEDDED_MIN_CPUS."""
    return max(EMBEDDED_MIN_CPUS, os.cpu_count() or 1)


def ray_temp_dir(home: Path) -> Path:
    """Ray's temp dir for `home`: under it if short enough for Ray's sockets, else /tmp."""
    preferred = home / "ray" / "tmp"
    if len(str(preferred)) <= MAX_TEMP_DIR_CHARS:
        return preferred
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
    return Path("/tmp") / f"corral-ray-{digest}"  # noqa: S108 - short on purpose, owner checked


def _use_token_auth(env: dict[str, str]) -> None:
    """Switch this process's Ray to token mode with the embedded head's token."""
    # ray/_raylet.pyi does not declare these two.
    raylet: Any = importlib.import_module("ray._raylet")
    os.environ.pop(AUTH_TOKEN_ENV, None)  # it would take precedence over the token file
    os.environ.update(env)
    # Ray reads RAY_AUTH_MODE into its C++ config once and caches the token; this is what
    # Ray itself does when it turns token mode on for a new local cluster.
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RayHeadError(f"{path} must be a directory owned by this user")


def _ensure_token(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def _jobs_api_answers(port: int, token: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) from /proc, or None where there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    return fields[0], int(fields[2])


def _is_head_process(head: RayHead) -> bool:
    """Whether head.pid is still our `ray start`: alive, leading its group, same temp dir."""
    try:
        os.kill(head.pid, 0)
        if os.getpgid(head.pid) != head.pid:
            return False
    except OSError:
        return False
    if not Path("/proc").is_dir():
        return True
    proc = _proc_stat(head.pid)
    if proc is None or proc[0] == "Z":
        return False
    try:
        argv = Path(f"/proc/{head.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"--temp-dir={head.temp_dir}".encode() in argv


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting to be reaped do not)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        return True
    for entry in proc_root.iterdir():
        if entry.name.isdigit():
            proc = _proc_stat(int(entry.name))
            if proc is not None and proc[1] == pgid and proc[0] != "Z":
                return True
    return False


def _signal(pid: int, sig: signal.Signals, *, group: bool) -> bool:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
