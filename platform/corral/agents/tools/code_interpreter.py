"""`code_interpreter`: the model's Python (`<|python_tag|>...`, argument `code`) run in a
bubblewrap sandbox (`corral.agents.tools.sandbox`) with the configured limits.

The response reads like Meta's reference interpreter: a status line, then the output in
`[stdout]`/`[stderr]` blocks. A Python error is a normal response (the model reads its
traceback); a limit that stops the run (CPU, wall time) is a ToolFailed carrying what was
printed before it; output over the budget is cut, with a note saying so.
"""

from __future__ import annotations

import re
from typing import Final

from corral.agents.protocols import ToolFailed
from corral.agents.tools.sandbox import BubblewrapSandbox, SandboxLimits, SandboxResult
from corral.api.common import ToolCall, ToolResponse
from corral.config import Settings

NAME: Final = "code_interpreter"
MAX_CODE_CHARS: Final = 64 * 1024
# Control characters but tab and newline (NUL cannot be stored in PostgreSQL text, and
# escape sequences have no business in a transcript).
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class CodeInterpreterTool:
    def __init__(self, sandbox: BubblewrapSandbox) -> None:
        self._sandbox = sandbox

    @classmethod
    def from_settings(cls, settings: Settings, *, bwrap: str = "bwrap") -> CodeInterpreterTool:
        limits = SandboxLimits(
            cpu_s=settings.code_interpreter_cpu_s,
            memory_bytes=settings.code_interpreter_memory_mb << 20,
            wall_s=settings.code_interpreter_wall_s,
            output_bytes=settings.code_interpreter_output_bytes,
        )
        return cls(
            BubblewrapSandbox(python=settings.code_interpreter_python, limits=limits, bwrap=bwrap)
        )

    @property
    def name(self) -> str:
        return NAME

    def ensure_available(self) -> None:
        self._sandbox.ensure_available()

    async def run(self, call: ToolCall) -> ToolResponse:
        code = call.arguments.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ToolFailed("code_interpreter needs a non-empty string argument 'code'")
        if len(code) > MAX_CODE_CHARS:
            raise ToolFailed(f"the code is longer than {MAX_CODE_CHARS} characters")
        result = await self._sandbox.run_python(code)
        limits = self._sandbox.limits
        if result.stop == "cpu":
            raise ToolFailed(
                f"stopped: the code used its {limits.cpu_s} s of CPU time\n{_output(result)}"
            )
        if result.stop == "wall":
            raise ToolFailed(
                f"stopped: the code ran longer than {limits.wall_s:g} s\n{_output(result)}"
            )
        if result.stop == "output":
            status = f"stopped: the output exceeded {limits.output_bytes} bytes and was truncated"
        elif result.exit_code == 0:
            status = "completed"
        else:
            status = f"error: exit code {result.exit_code}"
        text = f"{status}\n{_output(result)}".rstrip()
        return ToolResponse(tool_name=NAME, content=text)


def _output(result: SandboxResult) -> str:
    parts = []
    if result.stdout:
        parts.append(f"[stdout]\n{_clean(result.stdout)}\n[/stdout]")
    if result.stderr:
        parts.append(f"[stderr]\n{_clean(result.stderr)}\n[/stderr]")
    if result.truncated:
        parts.append("[output truncated]")
    return "\n".join(parts)


def _clean(text: str) -> str:
    return _CONTROL.sub("\ufffd", text.replace("\r\n", "\n")).rstrip()
