"""Read Llama 3.1 tool calls out of generated text, and map engine stop reasons to the spec's.

Llama 3.1 calls tools in these shapes (the stop token may or may not still be there):

    <|python_tag|>brave_search.call(query="weather in SF")<|eom_id|>     web_search
    <|python_tag|>wolfram_alpha.call(query="integrate x^2")<|eom_id|>    math
    <|python_tag|>import math; print(math.pi)<|eom_id|>                   code_interpreter
    {"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>    custom, JSON
    <function=get_weather>{"city": "Paris"}</function><|eot_id|>          custom, function tag

Only tools that were offered count: anything else stays plain content. Built-in call
arguments are read with `ast` (literals only, nothing is evaluated); JSON that does not
parse stays content. Text after `<|python_tag|>` that is not a call of an offered tool is
code for the code interpreter when that is offered, unless generation ran out of tokens
(the code would be cut off).
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import ValidationError

from corral.api.common import StopReason, ToolCall, ToolDefinition
from corral.llama3.prompt import (
    BUILTIN_CALL_NAMES,
    CODE_INTERPRETER,
    END_OF_TEXT,
    EOM,
    EOT,
    IMAGE_GEN,
    PYTHON_TAG,
    is_custom_tool,
)

EngineStopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]

_SPEC_STOP_REASONS: Final[dict[str, StopReason]] = {
    "end_of_turn": "finished_ok",
    "end_of_message": "finished_ok",  # a tool call waits for its result: the reply is whole
    "out_of_tokens": "max_tokens",
}
# The model's name for a built-in tool → the spec's. photogen is the name Meta's reference
# code gives image generation; Llama 3.1 was not trained on it, but read it if it comes.
_SPEC_TOOL_NAMES: Final[dict[str, str]] = {
    **{model: spec for spec, model in BUILTIN_CALL_NAMES.items()},
    "photogen": IMAGE_GEN,
}
_STOP_TOKENS: Final = (EOM, EOT, END_OF_TEXT)
_FUNCTION_TAG: Final = re.compile(r"<function=(?P<name>[^>\s]+)>")
_FUNCTION_END: Final = "</function>"
_JSON_WORDS: Final[dict[str, Any]] = {"true": True, "false": False, "null": None}


@dataclass(frozen=True)
class ParsedOutput:
    """An assistant reply split into its text and the tool calls it makes."""

    content: str
    tool_calls: list[ToolCall]


def to_spec_stop_reason(engine_reason: str) -> StopReason:
    """The spec's stop reason for the engine's (`serve_apps.engines.protocol.StopReason`,
    a str enum, or its value): the end of a turn or of a message is a finished reply."""
    try:
        return _SPEC_STOP_REASONS[engine_reason]
    except KeyError:
        raise ValueError(f"unknown engine stop reason {engine_reason!r}") from None


def parse_assistant_output(
    text: str, *, stop_reason: str, tools: Sequence[ToolDefinition]
) -> ParsedOutput:
    """Split generated text into content and the tool call it makes (at most one)."""
    to_spec_stop_reason(stop_reason)  # refuse an unknown reason early
    offered = {tool.tool_name for tool in tools}
    text = _without_stop_token(text)
    before, tag, after = text.partition(PYTHON_TAG)
    if tag:
        call = _builtin_call(after, offered) or _json_call(after, offered)
        if call is None:
            tagged = _function_tag_call(after, offered)
            if tagged is not None:
                call, rest = tagged
                before = f"{before.strip()}\n{rest}"
        if call is None and _runs_code(after, offered, stop_reason):
            call = _tool_call(CODE_INTERPRETER, {"code": after.strip()})
        if call is not None:
            return ParsedOutput(content=before.strip(), tool_calls=[call])
        return ParsedOutput(content=text.replace(PYTHON_TAG, ""), tool_calls=[])
    call = _json_call(text, offered)
    if call is not None:
        return ParsedOutput(content="", tool_calls=[call])
    tagged = _function_tag_call(text, offered)
    if tagged is not None:
        call, rest = tagged
        return ParsedOutput(content=rest, tool_calls=[call])
    return ParsedOutput(content=text, tool_calls=[])


class ToolCallStreamDetector:
    """Decides, from the start of a streamed reply, whether to hold its deltas back.

    A reply that begins (after whitespace) with `<|python_tag|>`, or with `{` or
    `<function=` when a custom tool is offered, may be a tool call: it is held whole and
    parsed by `finish()`. Any other reply is let through as it comes, so a tool call that
    appears later in a streamed reply is not looked for. With no tools offered, nothing is
    ever held.

        detector = ToolCallStreamDetector(tools)
        for delta in deltas:
            send_text(detector.feed(delta))           # "" while held
        rest = detector.finish(stop_reason=reason)    # held text and the call, if any
    """

    def __init__(self, tools: Sequence[ToolDefinition]) -> None:
        self._tools = tuple(tools)
        markers = [PYTHON_TAG] if self._tools else []
        if any(is_custom_tool(tool.tool_name) for tool in self._tools):
            markers += ["{", "<function="]
        self._markers = tuple(markers)
        self._text = ""
        self._state: Literal["undecided", "holding", "passing"] = (
            "undecided" if self._markers else "passing"
        )

    @property
    def could_be_tool_call(self) -> bool:
        """True while the reply so far may still turn out to be a tool call."""
        return self._state != "passing"

    @property
    def text(self) -> str:
        """Everything fed so far."""
        return self._text

    def feed(self, delta: str) -> str:
        """Take the next delta; return the text that may be sent now ("" while held)."""
        self._text += delta
        if self._state == "passing":
            return delta
        if self._state == "undecided":
            lead = self._text.lstrip()
            if any(lead.startswith(marker) for marker in self._markers):
                self._state = "holding"
            elif not any(marker.startswith(lead) for marker in self._markers):
                self._state = "passing"
                return self._text  # release what was held while undecided
        return ""

    def finish(self, *, stop_reason: str) -> ParsedOutput:
        """After the last delta: the held text parsed into content still to send and the
        tool call; nothing for a reply that was let through."""
        if self._state == "passing":
            return ParsedOutput(content="", tool_calls=[])
        return parse_assistant_output(self._text, stop_reason=stop_reason, tools=self._tools)


def _without_stop_token(text: str) -> str:
    stripped = text.rstrip()
    for token in _STOP_TOKENS:
        if stripped.endswith(token):
            return stripped.removesuffix(token)
    return text


def _spec_tool_name(name: str) -> str:
    return _SPEC_TOOL_NAMES.get(name, name)


def _tool_call(name: str, arguments: dict[str, Any]) -> ToolCall | None:
    try:
        if not _is_plain_json(arguments):
            return None
        return ToolCall(tool_name=name, arguments=arguments)
    except (ValidationError, RecursionError):
        return None


def _builtin_call(body: str, offered: Container[str]) -> ToolCall | None:
    """`brave_search.call(query="...", ...)`: keyword arguments with literal values."""
    try:
        tree = ast.parse(body.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    call = tree.body
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "call"
        and isinstance(call.func.value, ast.Name)
        and not call.args
    ):
        return None
    name = _SPEC_TOOL_NAMES.get(call.func.value.id)
    if name is None or name not in offered:
        return None
    arguments: dict[str, Any] = {}
    for argument in call.keywords:
        if argument.arg is None:  # **kwargs
            return None
        try:
            arguments[argument.arg] = _literal(argument.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None
    return _tool_call(name, arguments)


def _literal(node: ast.expr) -> Any:
    """A literal value; JSON's true/false/null are read too (models write them)."""
    if isinstance(node, ast.Name) and node.id in _JSON_WORDS:
        return _JSON_WORDS[node.id]
    return ast.literal_eval(node)


def _json_call(body: str, offered: Container[str]) -> ToolCall | None:
    """`{"name": ..., "parameters": {...}}`, also with `"type": "function"`, with the
    call nested under `"function"`, or with `"arguments"` for `"parameters"`."""
    body = body.strip()
    if not body.startswith("{"):
        return None
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or value.get("type", "function") != "function":
        return None
    if isinstance(value.get("function"), dict):
        value = value["function"]
    name = value.get("name")
    arguments = value.get("parameters", value.get("arguments", {}))
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    name = _spec_tool_name(name)
    return _tool_call(name, arguments) if name in offered else None


def _function_tag_call(text: str, offered: Container[str]) -> tuple[ToolCall, str] | None:
    """`<function=name>{...}</function>` (closing tag optional) and the text around it."""
    match = _FUNCTION_TAG.search(text)
    if match is None:
        return None
    name = _spec_tool_name(match["name"])
    if name not in offered:
        return None
    rest = text[match.end() :].lstrip()
    try:
        arguments, end = json.JSONDecoder(parse_constant=_refuse_constant).raw_decode(rest)
    except (ValueError, RecursionError):
        return None
    if not isinstance(arguments, dict):
        return None
    call = _tool_call(name, arguments)
    if call is None:
        return None
    after = rest[end:].lstrip().removeprefix(_FUNCTION_END)
    around = (text[: match.start()].strip(), after.strip())
    return call, "\n".join(part for part in around if part)


def _runs_code(body: str, offered: Container[str], stop_reason: str) -> bool:
    return CODE_INTERPRETER in offered and stop_reason != "out_of_tokens" and bool(body.strip())


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_plain_json(value: Any) -> bool:
    """Whether a parsed value is JSON as written: no tuples, sets, bytes or infinities."""
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_plain_json(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_plain_json(item) for key, item in value.items())
    return False
