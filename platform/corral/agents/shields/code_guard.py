"""The `code_guard` shield: static detection of insecure code in a message (shell
injection, eval/exec, unsafe deserialization, weak hashes, SQL built from strings,
hard-coded secrets, and a few shell/JavaScript/Java/C patterns).

Corral's own rules (`code_rules`), not the `codeshield` package from PyPI: codeshield
brings semgrep, whose pinned dependencies downgrade protobuf and opentelemetry beneath
the versions Ray needs in the same environment, and it runs semgrep as a subprocess per
check. Python here is read as a syntax tree (`ast`), so `yaml.safe_load`,
`hashlib.sha256`, a parametrised `cursor.execute(sql, params)` or a constant
`eval("1 + 1")` pass where a regex would not tell them apart; other languages are
matched by regular expressions.

What is judged: the last message's text: its fenced code blocks (```python ... ```,
labelled by language or not), a Llama 3 `<|python_tag|>` body (code the model means to
run), and, when it has neither, the whole text if it parses as Python (more than a lone
name or value), else the text by the patterns of no particular language (curl | sh,
rm -rf /, AWS keys); and any code in its tool
calls' `code` arguments (code_interpreter's). The first finding decides the violation
(`code_guard:<rule id>`); `details` lists up to five, with their lines.

params: `{"rules": [ids]}` checks only those rules, `{"exclude": [ids]}` all but those
(not both); an unknown rule id or key is a ValueError naming what is allowed (the shield
factory answers it with 422).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from corral.agents.shields.code_rules import (
    KNOWN_LANGUAGES,
    PYTHON_LANGUAGES,
    RULES,
    Finding,
    python_findings,
    python_text_findings,
    text_findings,
)
from corral.api.agentic_system import SafetyViolation
from corral.api.common import Message

SHIELD_TYPE: Final = "code_guard"
MAX_DETAILS: Final = 5
# A message that is text, not code: only language-free patterns apply to it.
PROSE: Final = "prose"
_FENCE = re.compile(
    r"(?m)^[ \t]*(```|~~~)[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*\1[ \t]*$|\Z)", re.DOTALL
)
_PYTHON_TAG = "<|python_tag|>"
_PYTHON_TAG_END = re.compile(r"<\|(eom_id|eot_id|end_of_text)\|>")
# Beyond this, code is judged by its text only (a syntax tree of megabytes costs memory).
MAX_PARSE_CHARS: Final = 200_000


@dataclass(frozen=True)
class CodeBlock:
    code: str
    language: str | None  # lower case; None: unlabelled
    where: str  # e.g. "code block 2", for details
    first_line: int  # the message line the code starts on


class CodeGuardShield:
    """Judges the last message's code against the chosen rules."""

    def __init__(self, rules: Iterable[str] = RULES) -> None:
        self._rules = frozenset(rules)

    @property
    def shield_type(self) -> str:
        return SHIELD_TYPE

    @property
    def rules(self) -> frozenset[str]:
        return self._rules

    async def check(self, messages: Sequence[Message]) -> SafetyViolation | None:
        if not messages:
            return None
        return self.judge(messages[-1])

    def judge(self, message: Message) -> SafetyViolation | None:
        """The violation in one message, or None (`check` of a conversation's last)."""
        found: list[tuple[CodeBlock, Finding]] = []
        for block in code_blocks(message):
            found += [(block, f) for f in findings(block) if f.rule in self._rules]
        if not found:
            return None
        block, first = found[0]
        rule = RULES[first.rule]
        lines = [
            f"{b.where}, line {b.first_line + f.line - 1}: {RULES[f.rule].cwe} {f.rule}: "
            f"{f.what} ({RULES[f.rule].title})"
            for b, f in found[:MAX_DETAILS]
        ]
        more = len(found) - MAX_DETAILS
        if more > 0:
            lines.append(f"and {more} more")
        return SafetyViolation(
            violation_type=f"{SHIELD_TYPE}:{rule.id}",
            details="insecure code: " + "; ".join(lines),
            suggested_user_response=(
                f"I can't go ahead with that code: it contains {rule.title} ({rule.cwe}). "
                f"Instead, {rule.instead}."
            ),
        )


def build_code_guard(params: Mapping[str, Any]) -> CodeGuardShield:
    """The shield for a ShieldConfig's params; ValueError for params it cannot take."""
    unknown = sorted(set(params) - {"rules", "exclude"})
    if unknown:
        raise ValueError(
            f"code_guard params take 'rules' or 'exclude' (lists of rule ids), not "
            f"{', '.join(repr(k)[:60] for k in unknown)}"
        )
    if "rules" in params and "exclude" in params:
        raise ValueError("code_guard params take 'rules' or 'exclude', not both")
    rules = set(RULES)
    if "rules" in params:
        rules = _rule_ids(params["rules"], "rules")
        if not rules:
            raise ValueError("code_guard params: 'rules' must name at least one rule")
    elif "exclude" in params:
        rules -= _rule_ids(params["exclude"], "exclude")
    return CodeGuardShield(rules)


def _rule_ids(value: Any, key: str) -> set[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"code_guard params: {key!r} must be a list of rule ids")
    unknown = sorted({v for v in value if v not in RULES})
    if unknown:
        raise ValueError(
            f"code_guard params: unknown rule id(s) {', '.join(repr(v[:60]) for v in unknown)} "
            f"in {key!r} (rules: {', '.join(sorted(RULES))})"
        )
    return set(value)


def message_text(message: Message) -> str:
    content = message.content
    parts = content if isinstance(content, list) else [content]
    return "".join(part for part in parts if isinstance(part, str))


def code_blocks(message: Message) -> list[CodeBlock]:
    """The code in a message, as described in the module docstring."""
    text = message_text(message)
    blocks: list[CodeBlock] = []
    for index, match in enumerate(_FENCE.finditer(text), start=1):
        label = match.group(2).lower() or None
        blocks.append(
            CodeBlock(
                code=match.group(3),
                language=label,
                where=f"code block {index}" + (f" ({label})" if label else ""),
                first_line=text.count("\n", 0, match.start(3)) + 1,
            )
        )
    tag = text.find(_PYTHON_TAG)
    if tag >= 0:
        start = tag + len(_PYTHON_TAG)
        end = _PYTHON_TAG_END.search(text, start)
        blocks.append(
            CodeBlock(
                code=text[start : end.start() if end else len(text)],
                language="python",
                where="<|python_tag|> code",
                first_line=text.count("\n", 0, start) + 1,
            )
        )
    if not blocks and text.strip():
        language = "python" if _reads_as_python(text) else PROSE
        blocks.append(CodeBlock(text, language, "message", 1))
    for call_index, call in enumerate(message.tool_calls, start=1):
        code = call.arguments.get("code")
        if isinstance(code, str) and code.strip():
            blocks.append(
                CodeBlock(
                    code=code,
                    language="python" if call.tool_name == "code_interpreter" else None,
                    where=f"tool call {call_index} ({call.tool_name[:60]}) code",
                    first_line=1,
                )
            )
    return blocks


def findings(block: CodeBlock) -> list[Finding]:
    """Every rule `block` breaks: Python by its syntax tree (by its text when it does
    not parse), other code by patterns (all of them for code in no known language),
    prose by the patterns of no particular language only (asking what `eval()` does in
    JavaScript is no violation)."""
    if block.language == PROSE:
        return sorted(text_findings(block.code, PROSE), key=lambda f: f.line)
    language = block.language if block.language in KNOWN_LANGUAGES else None
    if language in PYTHON_LANGUAGES or (language is None and _reads_as_python(block.code)):
        tree = _parse(block.code)
        if tree is None:
            found = [*python_text_findings(block.code), *text_findings(block.code, None)]
        else:
            found = [*python_findings(tree), *text_findings(block.code, "python")]
    else:
        found = list(text_findings(block.code, language))
    return sorted(found, key=lambda f: f.line)


def _parse(code: str) -> ast.Module | None:
    if len(code) > MAX_PARSE_CHARS:
        return None
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _reads_as_python(text: str) -> bool:
    """Text that parses as Python and is more than one bare expression (prose such as
    "hello" or "yes, please" parses too, as a name or a tuple)."""
    tree = _parse(text)
    if tree is None or not tree.body:
        return False
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr):
        return isinstance(tree.body[0].value, ast.Call)
    return True
