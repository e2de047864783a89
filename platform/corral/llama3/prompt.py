"""The Llama 3.1 prompt format: spec messages and tools in, the exact prompt text out.

The layout is Meta's published Llama 3.1 format (the model card's prompt format page, the
reference chat template shipped with Llama-3.1-Instruct, llama-models' `prompt_format.md`):

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n...<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

Without tools the messages are rendered as they are (exactly what the demo tokenizer's
chat template gives). With tools a system turn is built in front, in this order: the
tool header (`Environment: ipython`, `Tools: brave_search, wolfram_alpha`, the dates),
the custom-tool instructions when `tool_prompt_format` is "function_tag", then the
caller's own system message. Meta's reference encoders emit `Environment: ipython`
whenever any tool is offered, and so does this one; it is also what turns on the code
interpreter, which therefore never appears on the `Tools:` line.

Built-in tools map as the model was trained: `web_search` → `brave_search`, `math` →
`wolfram_alpha`, `code_interpreter` → ipython. Llama 3.1 has no image generation tool, so
`image_gen` is offered as a custom tool of that name (with a default `query` parameter
when its definition gives none) and is called like any other custom tool.

Custom tools, in one documented style per format:
- "json": the model card's "JSON based tool calling", which puts the function
  definitions at the head of the first user message (Meta's chat template does the same
  by default); the model answers `{"name": ..., "parameters": {...}}`.
- "function_tag": the model card's "user-defined custom tool calling", which puts the
  definitions and the `<function=name>{...}</function>` instructions in the system
  message, before the caller's own system prompt.
The spec's tool definitions carry a name and a JSON parameter schema but no description,
so the definitions show just those two; a description belongs in the parameter schema.

Message text is trimmed, as Meta's template does. A message's text may not spell one of
the Llama 3 special tokens (`<|eot_id|>`, ...): the engine would read it as the real
token, so a user could forge turns; such input is refused with InvalidRequest.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Sequence
from datetime import date
from typing import Final, Literal

from corral.api.common import Attachment, Content, JsonValue, Message, ToolCall, ToolDefinition
from corral.errors import InvalidRequest

BEGIN_OF_TEXT: Final = "<|begin_of_text|>"
END_OF_TEXT: Final = "<|end_of_text|>"
START_HEADER: Final = "<|start_header_id|>"
END_HEADER: Final = "<|end_header_id|>"
EOT: Final = "<|eot_id|>"  # end of turn
EOM: Final = "<|eom_id|>"  # end of message: a built-in tool call waits for its result
PYTHON_TAG: Final = "<|python_tag|>"

ToolPromptFormat = Literal["json", "function_tag"]

# Spec built-in tool → the name Llama 3.1 calls it by, as `<name>.call(query="...")`.
BUILTIN_CALL_NAMES: Final[dict[str, str]] = {
    "web_search": "brave_search",
    "math": "wolfram_alpha",
}
CODE_INTERPRETER: Final = "code_interpreter"
IMAGE_GEN: Final = "image_gen"
_IMAGE_GEN_PARAMETERS: Final[dict[str, JsonValue]] = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "description": "A description of the image to generate"}
    },
    "required": ["query"],
}

KNOWLEDGE_CUTOFF: Final = "December 2023"
_MONTHS: Final = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

# Every special token of the Llama 3.1 tokenizer, named or reserved.
_SPECIAL_TOKEN: Final = re.compile(
    r"<\|(?:begin_of_text|end_of_text|start_header_id|end_header_id|eot_id|eom_id"
    r"|python_tag|step_id|finetune_right_pad_id|reserved_special_token_\d+)\|>"
)

_JSON_TOOLS_INTRO: Final = (
    "Given the following functions, please respond with a JSON for a function call with "
    "its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument '
    "name and its value}. Do not use variables."
)
# Verbatim from Meta's model card, typo ("If a you choose") included: it is what the
# model was shown.
_FUNCTION_TAG_INSTRUCTIONS: Final = """\
If a you choose to call a function ONLY reply in the following format:
<{start_tag}={function_name}>{parameters}{end_tag}
where

start_tag => `<function`
parameters => a JSON dict with the function argument name as key and function argument \
value as value.
end_tag => `</function>`

Here is an example,
<function=example_function_name>{"example_name": "example_value"}</function>

Reminder:
- Function calls MUST follow the specified format
- Required parameters MUST be specified
- Only call one function at a time
- Put the entire function call reply on one line
- Always add your sources when using search results to answer the user query"""


def format_chat(
    messages: Sequence[Message],
    *,
    tools: Sequence[ToolDefinition] = (),
    tool_prompt_format: ToolPromptFormat = "json",
    add_generation_prompt: bool = True,
    today: date | None = None,
) -> str:
    """The Llama 3.1 prompt for a dialog, ending with the assistant header when
    `add_generation_prompt`. `today` fills the `Today Date:` line (default: today)."""
    if tool_prompt_format not in ("json", "function_tag"):
        raise ValueError(f"unknown tool prompt format {tool_prompt_format!r}")
    remaining = list(messages)
    parts = [BEGIN_OF_TEXT]
    json_tools_prefix = ""
    if tools:
        caller_system = ""
        if remaining and remaining[0].role == "system":
            caller_system = _text(remaining.pop(0).content).strip()
        custom = [tool for tool in tools if is_custom_tool(tool.tool_name)]
        system = _system_prompt(
            tools,
            custom_instructions=(
                _function_tag_tools(custom)
                if custom and tool_prompt_format == "function_tag"
                else ""
            ),
            caller_system=caller_system,
            today=today or date.today(),
        )
        parts.append(_turn("system", system, EOT))
        if custom and tool_prompt_format == "json":
            json_tools_prefix = _json_tools(custom)
            if not any(message.role == "user" for message in remaining):
                parts.append(_turn("user", json_tools_prefix, EOT))
    for message in remaining:
        if json_tools_prefix and message.role == "user":
            parts.extend(_message_turns(message, tool_prompt_format, prefix=json_tools_prefix))
            json_tools_prefix = ""
        else:
            parts.extend(_message_turns(message, tool_prompt_format))
    if add_generation_prompt:
        parts.append(_header("assistant"))
    return "".join(parts)


def format_completion(content: Content) -> str:
    """The prompt for raw completion: `<|begin_of_text|>` and the text, untrimmed. Special
    tokens in it are kept: a raw completion prompt may be a hand-written Llama prompt."""
    return BEGIN_OF_TEXT + _content_text(content)


def format_tool_call(call: ToolCall, tool_prompt_format: ToolPromptFormat = "json") -> str:
    """A tool call as Llama 3.1 writes it, with no end token: `<|python_tag|>` and a
    `brave_search.call(...)` / code for built-in tools, JSON or a function tag otherwise."""
    refuse_special_tokens(json.dumps(call.model_dump(), ensure_ascii=False))
    if call.tool_name in BUILTIN_CALL_NAMES:
        arguments = ", ".join(
            f"{_keyword(name)}={_python_literal(value)}" for name, value in call.arguments.items()
        )
        return f"{PYTHON_TAG}{BUILTIN_CALL_NAMES[call.tool_name]}.call({arguments})"
    if call.tool_name == CODE_INTERPRETER:
        code = call.arguments.get("code")
        if not isinstance(code, str):
            raise InvalidRequest("a code_interpreter tool call needs a string argument 'code'")
        return PYTHON_TAG + code
    if tool_prompt_format == "function_tag":
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        return f"<function={call.tool_name}>{arguments}</function>"
    return json.dumps({"name": call.tool_name, "parameters": call.arguments}, ensure_ascii=False)


def is_custom_tool(tool_name: str) -> bool:
    """Whether the model calls this tool through the custom (JSON / function tag) format."""
    return tool_name not in BUILTIN_CALL_NAMES and tool_name != CODE_INTERPRETER


def format_date(day: date) -> str:
    """`Today Date:` as Meta writes it, "21 September 2024" (independent of the locale)."""
    return f"{day.day:02d} {_MONTHS[day.month - 1]} {day.year}"


def _header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


def _turn(role: str, text: str, end: str) -> str:
    return f"{_header(role)}{text}{end}"


def _message_turns(
    message: Message, tool_prompt_format: ToolPromptFormat, *, prefix: str = ""
) -> list[str]:
    """A message's own turn (role "tool" is written `ipython`), then one ipython turn per
    tool response it carries. A tool message whose responses are all in `tool_responses`
    and whose own content is empty has no turn of its own. `prefix` (the JSON tool
    instructions) goes at the head of the text, a blank line before it."""
    turns: list[str] = []
    text = "\n\n".join(part for part in (prefix, _text(message.content).strip()) if part)
    if message.role == "assistant" and message.tool_calls:
        turns.append(_assistant_tool_call(text, message.tool_calls, tool_prompt_format))
    elif message.role == "tool":
        if text or not message.tool_responses:
            turns.append(_turn("ipython", text, EOT))
    else:
        turns.append(_turn(message.role, text, EOT))
    turns.extend(_turn("ipython", _response_text(r.content), EOT) for r in message.tool_responses)
    return turns


def _assistant_tool_call(
    text: str, calls: Sequence[ToolCall], tool_prompt_format: ToolPromptFormat
) -> str:
    """An assistant turn as the model emitted it: built-in calls end with <|eom_id|> (the
    model waits for the result), custom calls with <|eot_id|>. Text before a call is
    separated from it by <|python_tag|>, as Meta's reference encoder does."""
    if len(calls) != 1:
        raise InvalidRequest(
            f"Llama 3.1 makes one tool call per assistant message, this one has {len(calls)}"
        )
    (call,) = calls
    rendered = format_tool_call(call, tool_prompt_format)
    if text and not rendered.startswith(PYTHON_TAG):
        rendered = PYTHON_TAG + rendered
    end = EOT if is_custom_tool(call.tool_name) else EOM
    return _turn("assistant", text + rendered, end)


def _system_prompt(
    tools: Sequence[ToolDefinition], *, custom_instructions: str, caller_system: str, today: date
) -> str:
    builtin_names = list(
        dict.fromkeys(
            BUILTIN_CALL_NAMES[tool.tool_name]
            for tool in tools
            if tool.tool_name in BUILTIN_CALL_NAMES
        )
    )
    header = ["Environment: ipython"]
    if builtin_names:
        header.append("Tools: " + ", ".join(builtin_names))
    header.append(f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}")
    header.append(f"Today Date: {format_date(today)}")
    sections = ["\n".join(header), custom_instructions, caller_system]
    return "\n\n".join(section for section in sections if section)


def _tool_parameters(tool: ToolDefinition) -> dict[str, JsonValue]:
    if tool.parameters is None and tool.tool_name == IMAGE_GEN:
        return dict(_IMAGE_GEN_PARAMETERS)
    return dict(tool.parameters or {})


def _json_tools(custom: Sequence[ToolDefinition]) -> str:
    """The model card's JSON tool instructions, put at the head of the first user turn."""
    definitions = [
        _checked_json(
            {
                "type": "function",
                "function": {"name": tool.tool_name, "parameters": _tool_parameters(tool)},
            },
            indent=4,
        )
        for tool in custom
    ]
    return "\n\n".join([_JSON_TOOLS_INTRO, *definitions])


def _function_tag_tools(custom: Sequence[ToolDefinition]) -> str:
    """The model card's function-tag tool instructions, for the system turn."""
    definitions = "\n\n".join(
        _checked_json({"name": tool.tool_name, "parameters": _tool_parameters(tool)}, indent=2)
        for tool in custom
    )
    return f"You have access to the following functions:\n\n{definitions}\n\n\n" + (
        _FUNCTION_TAG_INSTRUCTIONS
    )


def _checked_json(value: dict[str, JsonValue], *, indent: int) -> str:
    rendered = json.dumps(value, ensure_ascii=False, indent=indent)
    refuse_special_tokens(rendered)
    return rendered


def _text(content: Content) -> str:
    """Message text with the special-token check applied."""
    text = _content_text(content)
    refuse_special_tokens(text)
    return text


def _response_text(content: Content) -> str:
    return _text(content).strip()


def _content_text(content: Content) -> str:
    """Text parts joined as they are; each attachment on a line of its own."""
    if isinstance(content, str):
        return content
    if isinstance(content, Attachment):
        return attachment_text(content)
    text = ""
    for part in content:
        if isinstance(part, str):
            text += part
        else:
            text = text.rstrip(" \t")
            if text and not text.endswith("\n"):
                text += "\n"
            text += attachment_text(part) + "\n"
    return text


def attachment_text(attachment: Attachment) -> str:
    """An attachment as the model sees it: its URL and media type; nothing is fetched.
    A `data:` URL is not spelled out (it would be the whole file, base64 encoded)."""
    if attachment.url.startswith("data:"):
        where = f"inline data, {len(attachment.url)} characters"
    else:
        where = attachment.url
    return f"[attachment ({attachment.mime_type}): {where}]"


def refuse_special_tokens(text: str) -> None:
    """InvalidRequest if `text` holds a Llama 3 special token: written into a prompt it
    would read as structure (a turn's end, a header), not as the caller's text."""
    found = _SPECIAL_TOKEN.search(text)
    if found:
        raise InvalidRequest(f"message content may not contain the special token {found.group()!r}")


def strip_special_tokens(text: str) -> str:
    """`text` with any Llama 3 special token spelled in it removed: for text the server
    puts into a prompt that no caller wrote (retrieved chunks, tool output), where a
    refusal would let a document break every turn that retrieves it."""
    return _SPECIAL_TOKEN.sub("", text)


def _keyword(name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise InvalidRequest(f"built-in tool argument name {name!r} is not a Python identifier")
    return name


def _python_literal(value: JsonValue) -> str:
    """A JSON value as a Python literal that `ast.literal_eval` reads back unchanged.
    Strings use JSON's escapes, which are all valid in a double-quoted Python string."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(item) for item in value) + "]"
    items = (
        f"{json.dumps(key, ensure_ascii=False)}: {_python_literal(item)}"
        for key, item in value.items()
    )
    return "{" + ", ".join(items) + "}"
