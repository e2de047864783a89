"""The Llama 3.1 prompt format: spec dialogs to prompt text, and tool calls back out."""

from corral.llama3.prompt import (
    ToolPromptFormat,
    format_chat,
    format_completion,
    format_tool_call,
    refuse_special_tokens,
    strip_special_tokens,
)
from corral.llama3.tool_calls import (
    EngineStopReason,
    ParsedOutput,
    ToolCallStreamDetector,
    parse_assistant_output,
    to_spec_stop_reason,
)

__all__ = [
    "EngineStopReason",
    "ParsedOutput",
    "ToolCallStreamDetector",
    "ToolPromptFormat",
    "format_chat",
    "format_completion",
    "format_tool_call",
    "parse_assistant_output",
    "refuse_special_tokens",
    "strip_special_tokens",
    "to_spec_stop_reason",
]
