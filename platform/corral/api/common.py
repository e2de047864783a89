"""Types the spec's API areas share: JSON values, URLs, messages, tools, sampling.

Every spec object refuses unknown fields (`additionalProperties: false`). Where the spec
marks a field required and also gives it a default, the field stays required and the
default is only shown in the JSON schema: the spec's `required` list is the contract.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
)
from typing_extensions import TypeAliasType

# The spec's "any JSON value" (`oneOf: null | boolean | number | string | array | object`).
# Integers stay integers; the schema is the spec's, word for word.
_JSON_VALUE_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {"type": "null"},
        {"type": "boolean"},
        {"type": "number"},
        {"type": "string"},
        {"type": "array"},
        {"type": "object"},
    ]
}


# How deeply arrays and objects may nest in a JSON value the API accepts (request fields
# and dataset cells alike). Real configs and dialogs nest a handful of levels; without a
# bound, deep values reach recursive code (pydantic's serializer stops at 255 levels,
# `json` at the interpreter's recursion limit) and fail as server errors.
MAX_JSON_DEPTH = 64


def _json_only(value: Any) -> Any:
    """Refuse what JSON cannot spell (a set, a datetime, NaN, a cycle) anywhere inside
    `value`, and values nested deeper than MAX_JSON_DEPTH: parsed JSON passes unless it is
    that deep, values built in Python may not."""
    # Depth-first without recursion; `open_containers` holds the path to the current item.
    stack: list[tuple[Any, bool]] = [(value, False)]
    open_containers: set[int] = set()
    while stack:
        item, leaving = stack.pop()
        if leaving:
            open_containers.discard(id(item))
        elif isinstance(item, dict | list):
            if id(item) in open_containers:
                raise ValueError("a JSON value cannot contain itself")
            if len(open_containers) >= MAX_JSON_DEPTH:
                raise ValueError(f"JSON values may nest at most {MAX_JSON_DEPTH} levels deep")
            if isinstance(item, dict) and not all(isinstance(key, str) for key in item):
                raise ValueError("JSON object keys must be strings")
            open_containers.add(id(item))
            stack.append((item, True))
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, False) for child in children)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("JSON numbers must be finite")
        elif item is not None and not isinstance(item, str | int):  # bool is an int
            raise ValueError(f"{type(item).__name__} is not a JSON value")
    return value


# Not pydantic's own JsonValue: its recursive definition would leave an empty, unused
# `JsonValue` component in the OpenAPI document.
JsonValue = Annotated[
    bool | int | float | str | list[Any] | dict[str, Any] | None,
    AfterValidator(_json_only),
    WithJsonSchema(_JSON_VALUE_SCHEMA),
]
JsonObject = dict[str, JsonValue]

# Control characters (NUL included) and lone surrogates: PostgreSQL cannot store NUL in
# text, a surrogate cannot be encoded as UTF-8, and neither belongs in an identifier.
_UNPRINTABLE = frozenset({"Cc", "Cs"})


def printable(value: str) -> str:
    """Refuse control characters and lone surrogates (not spelled as a `pattern`: the
    published schema stays the spec's)."""
    for position, char in enumerate(value):
        if unicodedata.category(char) in _UNPRINTABLE:
            raise ValueError(
                f"must not contain control characters or lone surrogates "
                f"(U+{ord(char):04X} at position {position})"
            )
    return value


# Longest identifier accepted anywhere: the width of the uuid columns.
MAX_ID_LENGTH = 128
# Every client-chosen identifier (dataset, job, agent, bank, session, turn, step, document
# uuids; model names; query parameters and body fields alike): 1 to MAX_ID_LENGTH
# printable characters, otherwise free-form. Where an id becomes a Ray id, a path or a
# collection name, services/ids.check_id applies a stricter alphabet on top.
Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_LENGTH),
    AfterValidator(printable),
]

URL_PATTERN = r"^(https?://|file://|data:)"
# A named alias, so the OpenAPI document has the spec's `URL` component; in Python a str.
URL = TypeAliasType(
    "URL",
    Annotated[
        str,
        Field(pattern=URL_PATTERN),
        AfterValidator(printable),
        WithJsonSchema({"type": "string", "format": "uri", "pattern": URL_PATTERN}),
    ],
)


def spec_default(value: object) -> dict[str, Any]:
    """`json_schema_extra` for a field the spec marks required yet gives a default."""
    return {"default": value}


class SpecModel(BaseModel):
    """Base of every spec object: unknown fields are refused, as are NaN and infinities
    (JSON has no spelling for them, and they poison training configs)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Role = Literal["system", "user", "assistant", "tool"]
StopReason = Literal["not_stopped", "finished_ok", "max_tokens"]
BuiltinTool = Literal["web_search", "math", "image_gen", "code_interpreter"]
ShieldType = Literal["llama_guard", "prompt_guard", "code_guard"]
# The spec's model names: chat (instruct) models, base models, and the reward model.
InstructModel = Literal["llama3_8b_chat", "llama3_70b_chat"]
PretrainedModel = Literal["llama3_8b", "llama3_70b"]
RewardModel = Literal["llama3_405b_reward"]


class Attachment(SpecModel):
    """Attachments are used to refer to external resources, such as images, videos,
    audio, etc."""

    url: URL
    mime_type: str


# The spec's content union: text, an attachment, or a list mixing both.
Content = str | Attachment | list[str | Attachment]


class ToolCall(SpecModel):
    """A tool call is a request to a tool."""

    tool_name: str
    arguments: JsonObject


class ToolResponse(SpecModel):
    tool_name: str
    content: Content


class Message(SpecModel):
    role: Role
    content: Content
    tool_calls: list[ToolCall]
    tool_responses: list[ToolResponse]


class Dialog(SpecModel):
    message: Message
    message_history: list[Message]


class ShieldConfig(SpecModel):
    shield_type: ShieldType = Field(description="The type of safety shield.")
    params: JsonObject


class ToolDefinition(SpecModel):
    """A tool a model may call: one of the built-in tools or any other name."""

    tool_name: BuiltinTool | str
    parameters: JsonObject | None = None
    input_shields: list[ShieldConfig]
    output_shields: list[ShieldConfig]


class SamplingParams(SpecModel):
    """How to sample tokens. All four fields are required by the spec; its defaults are
    shown in the schema. The bounds are Corral's: the spec gives none."""

    temperature: float = Field(
        ge=0.0, json_schema_extra=spec_default(0.0), description="At least 0."
    )
    strategy: str = Field(json_schema_extra=spec_default("greedy"))
    top_p: float = Field(
        gt=0.0, le=1.0, json_schema_extra=spec_default(0.95), description="In (0, 1]."
    )
    top_k: int = Field(
        ge=0, json_schema_extra=spec_default(0), description="At least 0; 0 means no top-k cut."
    )
