"""`math`: arithmetic the model asks for (Llama 3.1 calls it `wolfram_alpha.call(query=...)`),
evaluated by a small `ast` walker, never by `eval`.

Why not `simpleeval`: it evaluates a larger language (names, attribute access guarded by
a deny-list, comprehensions in some versions, strings) and has had sandbox escapes
through attributes; here there is no attribute access, no names but a fixed table, no
strings and no containers at all, so the attack surface is what this file shows. Every
operation that can grow a number (`**`, `*`, `factorial`) is
bounded before it is computed (integers to MAX_INT_BITS, factorial to MAX_FACTORIAL), so
`9**9**9` or `factorial(10**6)` fail at once with a clear message instead of burning CPU
or memory; the expression's length and nesting are bounded too.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Final

from corral.agents.protocols import ToolFailed
from corral.api.common import ToolCall, ToolResponse

NAME: Final = "math"
MAX_EXPRESSION_CHARS: Final = 500
MAX_NESTING: Final = 40  # parentheses and operators within each other
MAX_INT_BITS: Final = 4096  # ~1233 decimal digits, well under int→str's 4300-digit limit
MAX_FACTORIAL: Final = 400  # 400! has 869 digits
MAX_ROUND_DIGITS: Final = 100

Number = int | float

_CONSTANTS: Final[dict[str, float]] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _factorial(value: Number) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ToolFailed("factorial() takes a whole number")
        value = int(value)
    if value < 0:
        raise ToolFailed("factorial() of a negative number is undefined")
    if value > MAX_FACTORIAL:
        raise ToolFailed(f"factorial() is limited to n <= {MAX_FACTORIAL}")
    return math.factorial(value)


def _round(value: Number, digits: Number = 0) -> Number:
    if not isinstance(digits, int) or abs(digits) > MAX_ROUND_DIGITS:
        raise ToolFailed(f"round()'s digits must be a whole number within ±{MAX_ROUND_DIGITS}")
    return round(value, digits) if digits else round(value)


def _log(value: Number, base: Number | None = None) -> float:
    return math.log(value) if base is None else math.log(value, base)


def _whole(function: Callable[[float], int]) -> Callable[[Number], int]:
    def apply(value: Number) -> int:
        return value if isinstance(value, int) else function(value)

    return apply


# name → (function, smallest and largest number of arguments)
_FUNCTIONS: Final[dict[str, tuple[Callable[..., Number], int, int]]] = {
    "sqrt": (math.sqrt, 1, 1),
    "log": (_log, 1, 2),
    "ln": (math.log, 1, 1),
    "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1),
    "exp": (math.exp, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1),
    "acos": (math.acos, 1, 1),
    "atan": (math.atan, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "floor": (_whole(math.floor), 1, 1),
    "ceil": (_whole(math.ceil), 1, 1),
    "factorial": (_factorial, 1, 1),
}

_UNARY: Final[dict[type[ast.unaryop], Callable[[Number], Number]]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_BINARY_NAMES: Final[dict[type[ast.operator], str]] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitXor: "^",  # power, as in Wolfram Alpha's notation (the model is prompted with it)
}


class MathTool:
    """The `math` built-in tool: always available, no provider."""

    @property
    def name(self) -> str:
        return NAME

    def ensure_available(self) -> None:
        return None

    async def run(self, call: ToolCall) -> ToolResponse:
        expression = call.arguments.get("query", call.arguments.get("expression"))
        if not isinstance(expression, str):
            raise ToolFailed("math needs a string argument 'query' holding the expression")
        return ToolResponse(tool_name=NAME, content=format_number(evaluate(expression)))


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression; ToolFailed for anything else or too big."""
    text = expression.strip()
    if not text:
        raise ToolFailed("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolFailed(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolFailed(f"not an arithmetic expression: {text!r}") from None
    try:
        value = _Evaluator().value(tree.body, depth=0)
    except ZeroDivisionError:
        raise ToolFailed("division by zero") from None
    except OverflowError:
        raise ToolFailed("the result is too large") from None
    except ValueError as error:  # math domain errors: sqrt(-1), log(0)
        raise ToolFailed(f"math error: {error}") from None
    return value


def format_number(value: Number) -> str:
    """Integers exactly; floats to 15 significant digits (`0.1 + 0.2` reads `0.3`)."""
    if isinstance(value, int):
        return str(value)
    return format(value, ".15g")


class _Evaluator:
    def value(self, node: ast.expr, *, depth: int) -> Number:
        if depth > MAX_NESTING:
            raise ToolFailed(f"the expression nests more than {MAX_NESTING} levels deep")
        if isinstance(node, ast.Constant):
            # bool is an int subclass; True/False are not numbers here, nor is 1j.
            if isinstance(node.value, int | float) and not isinstance(node.value, bool):
                return _checked(node.value)
            raise ToolFailed(f"only numbers are allowed, not {node.value!r}")
        if isinstance(node, ast.Name):
            if node.id in _CONSTANTS:
                return _CONSTANTS[node.id]
            raise ToolFailed(f"unknown name {node.id!r} (constants: {', '.join(_CONSTANTS)})")
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self.value(node.operand, depth=depth + 1))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_NAMES:
            left = self.value(node.left, depth=depth + 1)
            right = self.value(node.right, depth=depth + 1)
            return _checked(_binary(_BINARY_NAMES[type(node.op)], left, right))
        if isinstance(node, ast.Call):
            return self._call(node, depth=depth)
        raise ToolFailed(f"unsupported syntax: {type(node).__name__}")

    def _call(self, node: ast.Call, *, depth: int) -> Number:
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise ToolFailed(f"unknown function {name!r} (functions: {', '.join(_FUNCTIONS)})")
        if node.keywords:
            raise ToolFailed("functions take positional arguments only")
        function, least, most = _FUNCTIONS[node.func.id]
        if not least <= len(node.args) <= most:
            count = str(least) if least == most else f"{least} or {most}"
            raise ToolFailed(f"{node.func.id}() takes {count} argument(s)")
        arguments = []
        for argument in node.args:
            if isinstance(argument, ast.Starred):
                raise ToolFailed("unsupported syntax: Starred")
            arguments.append(self.value(argument, depth=depth + 1))
        return _checked(function(*arguments))


def _binary(symbol: str, left: Number, right: Number) -> Number:
    if symbol == "+":
        return left + right
    if symbol == "-":
        return left - right
    if symbol == "*":
        if isinstance(left, int) and isinstance(right, int):
            _bound_bits(left.bit_length() + right.bit_length())
        return left * right
    if symbol == "/":
        return left / right
    if symbol == "//":
        return left // right
    if symbol == "%":
        return left % right
    return _power(left, right)


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
        if abs(base) > 1:  # 0, 1 and -1 stay small whatever the exponent
            _bound_bits(math.ceil(exponent * math.log2(abs(base))))
        return int(base**exponent)
    if isinstance(exponent, int) and abs(exponent) > MAX_INT_BITS:
        exponent = float(exponent)  # float power: overflows or underflows, never grows
    return math.pow(base, exponent)  # refuses complex results (ValueError)


def _bound_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise ToolFailed(f"the result would exceed {MAX_INT_BITS} bits (~1233 digits)")


def _checked(value: Number) -> Number:
    """Every intermediate value: integers within MAX_INT_BITS, floats finite."""
    if isinstance(value, int):
        _bound_bits(value.bit_length())
    elif math.isnan(value):
        raise ToolFailed("the result is not a number (e.g. inf - inf)")
    elif math.isinf(value):
        raise ToolFailed("the result is too large")
    return value
