"""code_interpreter under bubblewrap: each limit is shown to hold, and where no sandbox
can be made the tool refuses (it never runs code unsandboxed).

Tests that need a working bwrap skip without one, unless CORRAL_REQUIRE_SANDBOX=1 (CI),
where they fail instead."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import sys
import time
from pathlib import Path

import pytest

from corral.agents.protocols import ToolFailed, ToolUnavailable
from corral.agents.tools.code_interpreter import CodeInterpreterTool
from corral.agents.tools.sandbox import BubblewrapSandbox, SandboxLimits
from corral.api.common import ToolCall
from corral.config import Settings

REQUIRE_SANDBOX = os.environ.get("CORRAL_REQUIRE_SANDBOX") == "1"


def _tool(
    *,
    cpu_s: int = 5,
    memory_mb: int = 256,
    wall_s: float = 20.0,
    output_bytes: int = 64 * 1024,
    bwrap: str = "bwrap",
    python: str = sys.executable,
) -> CodeInterpreterTool:
    limits = SandboxLimits(
        cpu_s=cpu_s, memory_bytes=memory_mb << 20, wall_s=wall_s, output_bytes=output_bytes
    )
    return CodeInterpreterTool(BubblewrapSandbox(python=python, limits=limits, bwrap=bwrap))


def _run(tool: CodeInterpreterTool, code: str) -> str:
    response = asyncio.run(
        tool.run(ToolCall(tool_name="code_interpreter", arguments={"code": code}))
    )
    assert response.tool_name == "code_interpreter"
    assert isinstance(response.content, str)
    return response.content


@pytest.fixture(scope="module")
def sandbox() -> None:
    """Skip (or, with CORRAL_REQUIRE_SANDBOX=1, fail) where bwrap cannot sandbox here."""
    try:
        _tool().ensure_available()
    except ToolUnavailable as error:
        if REQUIRE_SANDBOX:
            pytest.fail(f"CORRAL_REQUIRE_SANDBOX=1 but {error}")
        pytest.skip(str(error))


@pytest.mark.usefixtures("sandbox")
def test_runs_python_and_reports_its_output() -> None:
    assert _run(_tool(), "print(6 * 7)") == "completed\n[stdout]\n42\n[/stdout]"
    failed = _run(_tool(), "import sys\nprint('out')\nsys.exit('bad input')")
    assert failed == "error: exit code 1\n[stdout]\nout\n[/stdout]\n[stderr]\nbad input\n[/stderr]"
    traceback = _run(_tool(), "1 / 0")
    assert traceback.startswith("error: exit code 1\n[stderr]\nTraceback")
    assert "ZeroDivisionError" in traceback
    # Control characters (NUL, escape sequences) do not reach the transcript.
    assert "\x00" not in _run(_tool(), "print('a\\x00b\\x1b[31m')")


@pytest.mark.usefixtures("sandbox")
def test_the_network_is_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
            "    print('connected')\n"
            "except OSError as error:\n"
            "    print('blocked', type(error).__name__)\n"
            "try:\n"
            "    socket.getaddrinfo('example.org', 80)\n"
            "    print('resolved')\n"
            "except OSError:\n"
            "    print('no dns')\n"
        )
        output = _run(_tool(), code)
        assert "blocked ConnectionRefusedError" in output  # its own empty loopback
        assert "no dns" in output
        assert "connected" not in output and "resolved" not in output
        readable, _, _ = select.select([server], [], [], 0)
        assert readable == []  # the host's server never saw a connection


@pytest.mark.usefixtures("sandbox")
def test_cpu_time_is_limited() -> None:
    start = time.monotonic()
    with pytest.raises(ToolFailed, match="used its 1 s of CPU time") as error:
        _run(_tool(cpu_s=1, wall_s=30), "print('spinning', flush=True)\nwhile True:\n    pass")
    assert "spinning" in str(error.value)  # what it printed before is kept
    assert time.monotonic() - start < 15  # killed by the CPU limit, not the wall clock


@pytest.mark.usefixtures("sandbox")
def test_memory_is_limited() -> None:
    tool = _tool(memory_mb=128)
    assert "fits" in _run(tool, "block = bytearray(32 << 20)\nprint('fits')")
    output = _run(tool, "block = bytearray(256 << 20)\nprint('allocated')")
    assert output.startswith("error: exit code 1")
    assert "MemoryError" in output and "allocated" not in output


@pytest.mark.usefixtures("sandbox")
def test_wall_time_is_limited() -> None:
    start = time.monotonic()
    with pytest.raises(ToolFailed, match=r"ran longer than 1\.5 s") as error:
        _run(_tool(wall_s=1.5), "import time\nprint('started', flush=True)\ntime.sleep(60)")
    assert "started" in str(error.value)
    assert time.monotonic() - start < 6


@pytest.mark.usefixtures("sandbox")
def test_output_is_capped_and_truncated_with_a_note() -> None:
    tool = _tool(output_bytes=1000, wall_s=20)
    start = time.monotonic()
    output = _run(tool, "while True:\n    print('y' * 100)")  # endless: killed at the cap
    assert time.monotonic() - start < 10
    assert output.startswith("stopped: the output exceeded 1000 bytes and was truncated")
    assert output.endswith("[output truncated]")
    assert output.count("y") <= 1000
    stderr = _run(tool, "import sys\nsys.stderr.write('z' * 10**6)")  # stderr counts too
    assert "[output truncated]" in stderr and stderr.count("z") <= 1000


@pytest.mark.usefixtures("sandbox")
def test_each_run_gets_a_throwaway_directory_and_the_host_is_not_writable(tmp_path: Path) -> None:
    host_file = tmp_path / "host.txt"
    host_file.write_text("host data")
    tool = _tool()
    first = _run(
        tool,
        "import os\n"
        "open('left-behind', 'w').write('x')\n"
        "open('/tmp/also-left', 'w').write('x')\n"
        "print(os.getcwd(), sorted(os.listdir('.')))\n",
    )
    assert "/tmp ['also-left', 'left-behind']" in first
    probe = {
        "host_file": str(host_file),
        "writable": [
            "/usr/corral-probe",
            f"{sys.base_prefix}/corral-probe",
            "/corral-probe",
            "/dev/shm/corral-probe",
        ],
    }
    second = _run(
        tool,
        "import json, os\n"
        f"probe = json.loads({json.dumps(json.dumps(probe))})\n"
        "print('left:', sorted(os.listdir('.')))\n"
        "print('host file visible:', os.path.exists(probe['host_file']))\n"
        "for path in probe['writable']:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError as error:\n"
        "        print('refused', type(error).__name__)\n",
    )
    assert "left: []" in second
    assert "host file visible: False" in second
    assert "wrote" not in second and second.count("refused") == 4
    assert host_file.read_text() == "host data"
    assert not Path("/usr/corral-probe").exists()


@pytest.mark.usefixtures("sandbox")
def test_no_secret_of_the_api_process_reaches_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_WEB_SEARCH_API_KEY", "brave-secret-1234")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-5678")
    output = _run(
        _tool(), "import os, json\nprint(json.dumps(dict(os.environ)))\nprint(os.getuid())"
    )
    assert "secret" not in output
    environment = json.loads(output.split("\n")[2])
    assert set(environment) <= {"PATH", "HOME", "LANG", "PWD", "LC_CTYPE"}
    assert output.split("\n")[3] == "65534"  # nobody, not the API's user


def test_refuses_without_bubblewrap() -> None:
    tool = _tool(bwrap="/nonexistent/bwrap")
    with pytest.raises(ToolUnavailable, match=r"bubblewrap .*was not found"):
        tool.ensure_available()
    with pytest.raises(ToolUnavailable, match="never runs unsandboxed"):
        _run(tool, "print('ran anyway')")


def test_refuses_where_namespaces_cannot_be_made_and_probes_once(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fake_bwrap = tmp_path / "bwrap"
    fake_bwrap.write_text(
        "#!/bin/sh\n"
        f"echo call >> {calls}\n"
        "echo 'bwrap: No permissions to create new namespace' >&2\n"
        "exit 1\n"
    )
    fake_bwrap.chmod(0o755)
    tool = _tool(bwrap=str(fake_bwrap))
    for _ in range(2):
        with pytest.raises(ToolUnavailable, match=r"could not create its sandbox.*No permissions"):
            tool.ensure_available()
    with pytest.raises(ToolUnavailable):
        _run(tool, "print('ran anyway')")
    assert calls.read_text() == "call\n"  # probed once, the refusal cached


@pytest.mark.usefixtures("sandbox")  # bubblewrap is looked for first
def test_refuses_without_the_interpreter() -> None:
    with pytest.raises(ToolUnavailable, match="interpreter '/nonexistent/python3' was not found"):
        _tool(python="/nonexistent/python3").ensure_available()


def test_from_settings_takes_the_limits() -> None:
    settings = Settings(
        code_interpreter_cpu_s=3,
        code_interpreter_memory_mb=100,
        code_interpreter_wall_s=4.5,
        code_interpreter_output_bytes=999,
    )
    tool = CodeInterpreterTool.from_settings(settings, bwrap="/nonexistent/bwrap")
    assert tool._sandbox.limits == SandboxLimits(
        cpu_s=3, memory_bytes=100 << 20, wall_s=4.5, output_bytes=999
    )


@pytest.mark.parametrize("arguments", [{}, {"code": ""}, {"code": 5}, {"code": "x" * 70000}])
def test_bad_arguments_are_refused(arguments: dict[str, object]) -> None:
    with pytest.raises(ToolFailed, match="code"):
        asyncio.run(_tool().run(ToolCall(tool_name="code_interpreter", arguments=arguments)))  # type: ignore[arg-type]


@pytest.mark.usefixtures("sandbox")
def test_file_size_and_the_working_directory_are_capped() -> None:
    limits = SandboxLimits(
        cpu_s=5,
        memory_bytes=256 << 20,
        wall_s=20,
        output_bytes=4096,
        file_bytes=1 << 20,
        tmp_bytes=3 << 20,
    )
    tool = CodeInterpreterTool(BubblewrapSandbox(python=sys.executable, limits=limits))
    output = _run(
        tool,
        "import errno\n"
        "def write(name, size):\n"
        "    try:\n"
        "        open(name, 'wb').write(b'x' * size)\n"
        "        print('wrote', name)\n"
        "    except OSError as error:\n"
        "        print('refused', name, errno.errorcode[error.errno])\n"
        "write('big', 2 << 20)\n"
        "for n in range(4):\n"
        "    write(f'part{n}', 1 << 20)\n",
    )
    assert "refused big EFBIG" in output  # RLIMIT_FSIZE
    assert "wrote part0" in output and "wrote part1" in output
    assert "refused part3 ENOSPC" in output  # the tmpfs's size
