"""The math tool's evaluator: arithmetic right, everything else refused, bombs bounded."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from corral.agents.protocols import ToolFailed
from corral.agents.tools.math_tool import MathTool, evaluate, format_number
from corral.api.common import ToolCall


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("2 ** 10", 1024),
        ("2 ^ 10", 1024),  # Wolfram Alpha's power
        ("-2 ** 2", -4),
        ("+-+3", -3),
        ("2 ** -1", 0.5),
        ("sqrt(16) + abs(-2)", 6.0),
        ("log(e)", 1.0),
        ("log(8, 2)", 3.0),
        ("round(2.675, 2)", 2.67),
        ("round(2.5)", 2),
        ("floor(-2.5) + ceil(2.1)", 0),
        ("factorial(20)", 2432902008176640000),
        ("2 ** 4000", 2**4000),
        ("1e3 * 2", 2000.0),
    ],
)
def test_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == value


def test_trigonometry_and_constants() -> None:
    assert evaluate("sin(pi / 2)") == pytest.approx(1.0)
    assert evaluate("cos(0) + tan(0)") == 1.0
    assert evaluate("tau / 2") == math.pi


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('id')", "unknown function"),
        ("(1).__class__", "unsupported syntax: Attribute"),
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("x + 1", "unknown name 'x'"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("1j * 1j", "only numbers"),
        ("[1, 2]", "unsupported syntax: List"),
        ("1 if 1 else 2", "unsupported syntax: IfExp"),
        ("lambda: 1", "unsupported syntax: Lambda"),
        ("1 < 2", "unsupported syntax: Compare"),
        ("1 << 5", "unsupported syntax: BinOp"),
        ("sqrt(x=4)", "positional arguments only"),
        ("sqrt(*[4])", "Starred"),
        ("sqrt(1, 2)", r"sqrt\(\) takes 1 argument"),
        ("math.sqrt(4)", "unknown function 'math.sqrt'"),
        ("1 +", "not an arithmetic expression"),
        ("x = 1", "not an arithmetic expression"),
        ("", "empty"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("sqrt(-1)", "math error"),
        ("log(0)", "math error"),
        ("(-8) ** 0.5", "math error"),
        ("factorial(2.5)", "whole number"),
        ("factorial(-1)", "negative"),
        ("round(1.5, 0.5)", "digits"),
        ("1e308 * 10", "too large"),
        ("1e308 * 10 - 1e308 * 10", "too large"),
        ("exp(1000)", "too large"),
    ],
)
def test_refused_with_a_clear_message(expression: str, message: str) -> None:
    with pytest.raises(ToolFailed, match=message):
        evaluate(expression)


@pytest.mark.parametrize(
    "bomb",
    [
        "9 ** 9 ** 9",
        "9 ^ (9 ^ 9)",
        "2 ** 100000",
        "(-3) ** 10 ** 8",
        "10 ** 10 ** 100",
        "factorial(10 ** 6)",
        "factorial(factorial(20))",
        "(2 ** 4000) * (2 ** 4000)",
        "9" * 1300,
        "2.0 ** 10 ** 400",
        "round(1.0, 10 ** 9)",
    ],
)
def test_bombs_are_refused_at_once(bomb: str) -> None:
    start = time.monotonic()
    with pytest.raises(ToolFailed, match=r"exceed|limited|too large|digits|longer"):
        evaluate(bomb)
    assert time.monotonic() - start < 0.5


def test_long_and_deep_expressions_are_refused() -> None:
    with pytest.raises(ToolFailed, match="longer than 500"):
        evaluate("1+" * 300 + "1")
    with pytest.raises(ToolFailed, match="nests more than"):
        evaluate("abs(" * 60 + "1" + ")" * 60)
    with pytest.raises(ToolFailed, match="not an arithmetic expression"):
        evaluate("(" * 240 + "1" + ")" * 240)  # beyond the parser's own bound
    with pytest.raises(ToolFailed, match="nests more than"):
        evaluate("-" * 100 + "1")
    # within the bounds, all is well
    assert evaluate("abs(" * 30 + "1" + ")" * 30) == 1
    assert evaluate("+".join(["1"] * 30)) == 30


def test_numbers_are_formatted_for_reading() -> None:
    assert format_number(evaluate("0.1 + 0.2")) == "0.3"
    assert format_number(evaluate("sqrt(16)")) == "4"
    assert format_number(evaluate("2 ** 70")) == str(2**70)
    assert format_number(evaluate("1 / 3")) == "0.333333333333333"


def test_the_tool_reads_the_query_argument() -> None:
    tool = MathTool()
    tool.ensure_available()
    assert tool.name == "math"
    for arguments in ({"query": "6 * 7"}, {"expression": "6 * 7"}):
        response = asyncio.run(tool.run(ToolCall(tool_name="math", arguments=arguments)))
        assert (response.tool_name, response.content) == ("math", "42")
    with pytest.raises(ToolFailed, match="'query'"):
        asyncio.run(tool.run(ToolCall(tool_name="math", arguments={"q": "1"})))
