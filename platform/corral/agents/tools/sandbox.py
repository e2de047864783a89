"""Run Python under bubblewrap: no network, nothing of the host but the read-only system
and the interpreter, a throwaway working directory, an empty environment, and limits.

The sandbox (`bwrap`):
- `--unshare-all` (user, pid, network, ipc, uts, cgroup namespaces): the network
  namespace has only its own loopback, so nothing on the host or beyond is reachable;
  `--disable-userns` stops the code making namespaces of its own.
- runs as uid/gid 65534 inside, all capabilities dropped, `--new-session` (no terminal
  injection), `--die-with-parent`.
- read-only binds of /usr, /lib*, /bin, /sbin (or their merged-/usr symlinks), the dynamic
  linker's cache and the interpreter's install prefix; nothing else of the host (no /home,
  /root, /etc, /work, the API's files): what is not bound does not exist inside.
- /tmp is a fresh size-capped tmpfs and the working directory: gone when the run ends;
  everything else (the root, /dev, the binds) is read-only.
- `--clearenv` with PATH, HOME and LANG only: no secret of the API process leaks in.

Limits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE (and no core files) are set by
a fixed prelude inside the sandbox, which then execs a fresh interpreter reading the code
from stdin; setting RLIMIT_NPROC inside the new user namespace counts only the sandbox's
own processes. Wall time is enforced here (the whole process group is killed; the pid
namespace dies with its init), as is the output budget (at most N bytes are read, then the
run is killed and the output marked truncated).

Where no sandbox can be made (no bwrap, or namespaces refused, e.g. a container without
user namespaces), a trivial probe run fails once, the failure is cached, and every run is
refused: code never runs unsandboxed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from corral.agents.protocols import ToolUnavailable

SANDBOX_UID: Final = 65534  # nobody
WORK_DIR: Final = "/tmp"  # noqa: S108 (a private tmpfs inside the sandbox)
_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
_PROBE_TIMEOUT_S: Final = 30.0
# Set the limits, then replace this process with a fresh interpreter that reads the code
# from stdin (so the code runs as a plain `__main__`, with no trace of the prelude).
_PRELUDE: Final = """\
import os, resource, sys
cpu, memory, processes, file_bytes = (int(v) for v in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
os.execv(sys.executable, [sys.executable, "-I", "-X", "utf8", "-"])
"""
# The system directories a dynamically linked interpreter may need.
_SYSTEM_DIRS: Final = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_EXIT_SIGNAL_BASE: Final = 128  # bwrap exits 128+N when the command dies of signal N


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int
    memory_bytes: int
    wall_s: float
    output_bytes: int
    processes: int = 32
    file_bytes: int = 16 << 20  # largest single file the code may write
    tmp_bytes: int = 64 << 20  # the whole working directory (tmpfs counts as memory)


Stop = Literal["exited", "cpu", "wall", "output"]


@dataclass(frozen=True)
class SandboxResult:
    stop: Stop  # why the run ended: it exited, or which limit stopped it
    exit_code: int | None  # the code's exit status (None when it was killed here)
    stdout: str
    stderr: str
    truncated: bool  # the output went over the budget and was cut
    wall_s: float


class BubblewrapSandbox:
    """Runs code in a fresh bubblewrap sandbox per call. `bwrap` and `python` are names
    on PATH or paths; `python` is the operator's interpreter (never the user's)."""

    def __init__(self, *, python: str, limits: SandboxLimits, bwrap: str = "bwrap") -> None:
        self._python = python
        self._bwrap = bwrap
        self.limits = limits
        self._lock = threading.Lock()
        self._checked = False
        self._refusal: str | None = None
        self._command: tuple[str, ...] = ()

    def ensure_available(self) -> None:
        """Raise ToolUnavailable unless a trivial run in the sandbox works (probed once)."""
        with self._lock:
            if not self._checked:
                self._refusal = self._probe()
                self._checked = True
        if self._refusal is not None:
            raise ToolUnavailable(self._refusal)

    async def run_python(self, code: str) -> SandboxResult:
        """Run `code` in a new sandbox; ToolUnavailable where no sandbox can be made."""
        self.ensure_available()
        start = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed whole
            env={"PATH": _PATH},
        )
        try:
            return await self._collect(process, code.encode(), start)
        finally:
            _kill_group(process)
            await _drain(process)
            await process.wait()

    async def _collect(
        self, process: asyncio.subprocess.Process, code: bytes, start: float
    ) -> SandboxResult:
        assert process.stdin and process.stdout and process.stderr
        budget = self.limits.output_bytes
        streams: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        over_budget = asyncio.Event()

        async def feed() -> None:
            assert process.stdin
            try:
                process.stdin.write(code)
                await process.stdin.drain()
                process.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the code exited (or was killed) before reading all of itself

        async def read(name: str, stream: asyncio.StreamReader) -> None:
            while chunk := await stream.read(65536):
                used = sum(len(buffer) for buffer in streams.values())
                streams[name] += chunk[: max(budget - used, 0)]
                if used + len(chunk) > budget:
                    over_budget.set()
                    return

        readers: asyncio.Future[Any] = asyncio.gather(
            feed(), read("stdout", process.stdout), read("stderr", process.stderr)
        )
        overflow: asyncio.Future[Any] = asyncio.ensure_future(over_budget.wait())
        stop: Stop = "exited"
        try:
            done, _ = await asyncio.wait(
                {readers, overflow},
                timeout=self.limits.wall_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if overflow in done:
                stop = "output"
            elif not done:
                stop = "wall"
        finally:
            overflow.cancel()
            if stop != "exited":
                _kill_group(process)
            readers.cancel()
            await asyncio.gather(readers, return_exceptions=True)
            await _drain(process)
        try:  # the output is closed; the process exits at once (its namespace with it)
            remaining = self.limits.wall_s - (time.monotonic() - start)
            returncode = await asyncio.wait_for(process.wait(), timeout=max(remaining, 1.0))
        except TimeoutError:
            _kill_group(process)
            returncode = await process.wait()
            stop = "wall"
        exit_code: int | None = returncode
        if stop == "exited" and returncode in (
            _EXIT_SIGNAL_BASE + signal.SIGXCPU,
            _EXIT_SIGNAL_BASE + signal.SIGKILL,
        ):
            # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL a second later if caught.
            stop, exit_code = "cpu", None
        elif stop != "exited":
            exit_code = None
        return SandboxResult(
            stop=stop,
            exit_code=exit_code,
            stdout=streams["stdout"].decode("utf-8", "replace"),
            stderr=streams["stderr"].decode("utf-8", "replace"),
            truncated=stop == "output",
            wall_s=time.monotonic() - start,
        )

    def _probe(self) -> str | None:
        """None when the sandbox works; otherwise why not (the refusal's message)."""
        bwrap = shutil.which(self._bwrap)
        if bwrap is None:
            return (
                f"code_interpreter is unavailable: bubblewrap ({self._bwrap!r}) was not found; "
                "install the 'bubblewrap' package (code never runs unsandboxed)"
            )
        interpreter = _interpreter(self._python)
        if isinstance(interpreter, str):
            return interpreter
        executable, prefix = interpreter
        self._command = (
            bwrap,
            *self._sandbox_args(prefix),
            str(executable),
            "-I",
            "-S",  # the prelude needs no site-packages: one interpreter start made cheaper
            "-c",
            _PRELUDE,
            str(self.limits.cpu_s),
            str(self.limits.memory_bytes),
            str(self.limits.processes),
            str(self.limits.file_bytes),
        )
        try:
            probe = subprocess.run(  # noqa: S603 (fixed arguments, no user input)
                self._command,
                input=b"print('sandbox ok')",
                capture_output=True,
                timeout=_PROBE_TIMEOUT_S,
                env={"PATH": _PATH},
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"code_interpreter is unavailable: the sandbox could not start ({error})"
        if probe.returncode != 0 or probe.stdout.strip() != b"sandbox ok":
            detail = (probe.stderr or probe.stdout).decode("utf-8", "replace").strip()[:300]
            return (
                "code_interpreter is unavailable: bubblewrap could not create its sandbox "
                f"here (exit {probe.returncode}: {detail or 'no output'}); user namespaces may "
                "be disabled on this host. Code never runs unsandboxed."
            )
        return None

    def _sandbox_args(self, prefix: Path) -> list[str]:
        args = [
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
            "--cap-drop",
            "ALL",
            "--die-with-parent",
            "--new-session",
            "--hostname",
            "sandbox",
        ]
        for directory in _SYSTEM_DIRS:
            path = Path(directory)
            if path.is_symlink():  # merged /usr: /bin -> usr/bin
                args += ["--symlink", os.readlink(path), directory]
            elif path.is_dir():
                args += ["--ro-bind", directory, directory]
        args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        if not any(prefix.is_relative_to(directory) for directory in _SYSTEM_DIRS):
            args += ["--ro-bind", str(prefix), str(prefix)]
        args += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(self.limits.tmp_bytes),
            "--tmpfs",
            WORK_DIR,
            "--chdir",
            WORK_DIR,
            # The root and /dev are tmpfs bwrap made: read-only, or code could fill memory
            # through them past the capped /tmp (not recursive: /tmp, /dev/null stay).
            "--remount-ro",
            "/dev",
            "--remount-ro",
            "/",
            "--clearenv",
            "--setenv",
            "PATH",
            _PATH,
            "--setenv",
            "HOME",
            WORK_DIR,
            "--setenv",
            "LANG",
            "C.UTF-8",
        ]
        return args


def _interpreter(python: str) -> tuple[Path, Path] | str:
    """The interpreter's real executable and install prefix, or why it cannot be used.

    The configured command may be a wrapper (a venv link, a pyenv shim), so the interpreter
    is asked for its own `sys.executable` and `sys.base_prefix`: a fixed command run on the
    operator's interpreter, never user code."""
    found = shutil.which(python)
    if found is None:
        return f"code_interpreter is unavailable: the interpreter {python!r} was not found"
    try:
        answer = subprocess.run(  # noqa: S603 (fixed arguments, no user input)
            [found, "-I", "-S", "-c", "import sys; print(sys.executable); print(sys.base_prefix)"],
            capture_output=True,
            timeout=_PROBE_TIMEOUT_S,
            env={"PATH": _PATH},
            check=True,
        )
        executable, prefix = answer.stdout.decode().splitlines()
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        return f"code_interpreter is unavailable: the interpreter {python!r} did not run ({error})"
    return Path(executable).resolve(), Path(prefix).resolve()


def _kill_group(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


async def _drain(process: asyncio.subprocess.Process) -> None:
    """Read what is left in the pipes, discarding it, until they end (they do once the
    sandbox is gone): a full, unread pipe pauses its transport, which would then never
    see the end, and the process would never be reaped."""
    for stream in (process.stdout, process.stderr):
        if stream is None:
            continue
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(5):
                while await stream.read(65536):
                    pass
