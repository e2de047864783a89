"""Tool calls read out of real-looking Llama 3.1 output, and stop reasons."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from corral.api.common import JsonValue, ToolCall, ToolDefinition
from corral.llama3 import (
    ParsedOutput,
    ToolCallStreamDetector,
    parse_assistant_output,
    to_spec_stop_reason,
)


def tool(name: str) -> ToolDefinition:
    return ToolDefinition(tool_name=name, input_shields=[], output_shields=[])


def tools(*names: str) -> list[ToolDefinition]:
    return [tool(name) for name in names]


ALL_TOOLS = tools("web_search", "math", "code_interpreter", "image_gen", "get_weather")


def parse(
    text: str, offered: Sequence[ToolDefinition] = ALL_TOOLS, stop_reason: str = "end_of_turn"
) -> ParsedOutput:
    return parse_assistant_output(text, stop_reason=stop_reason, tools=offered)


def only_call(name: str, **arguments: JsonValue) -> ParsedOutput:
    return ParsedOutput(content="", tool_calls=[ToolCall(tool_name=name, arguments=arguments)])


def plain(text: str) -> ParsedOutput:
    return ParsedOutput(content=text, tool_calls=[])


# --- built-in tools ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '<|python_tag|>brave_search.call(query="weather in SF")<|eom_id|>',
        '<|python_tag|>brave_search.call(query="weather in SF")',
        '<|python_tag|>brave_search.call(query="weather in SF")<|eot_id|>',
        '<|python_tag|> brave_search.call( query = "weather in SF" )\n<|eom_id|>\n',
        "<|python_tag|>brave_search.call(query='weather in SF')",
    ],
)
def test_brave_search_is_web_search(text: str) -> None:
    assert parse(text, stop_reason="end_of_message") == only_call(
        "web_search", query="weather in SF"
    )


def test_wolfram_alpha_is_math() -> None:
    text = '<|python_tag|>wolfram_alpha.call(query="solve x^3 - 4x^2 + 6x - 24 = 0")<|eom_id|>'
    assert parse(text) == only_call("math", query="solve x^3 - 4x^2 + 6x - 24 = 0")


def test_builtin_arguments_with_escaped_quotes_and_several_keywords() -> None:
    text = (
        r'<|python_tag|>brave_search.call(query="the \"best\" pizza\\pasta", count=3, '
        r"""safe=true, lang=None, tags=['a', "b"], ratio=-0.5)"""
    )
    assert parse(text) == only_call(
        "web_search",
        query='the "best" pizza\\pasta',
        count=3,
        safe=True,
        lang=None,
        tags=["a", "b"],
        ratio=-0.5,
    )


@pytest.mark.parametrize(
    "text",
    [
        '<|python_tag|>brave_search.call(query=__import__("os").system("rm -rf /"))',
        '<|python_tag|>brave_search.call(query="a" + "b")',
        "<|python_tag|>brave_search.call(query={1, 2})",
        "<|python_tag|>brave_search.call(query=1e999)",
        '<|python_tag|>brave_search.call("positional")',
        "<|python_tag|>brave_search.call(**{'query': 'x'})",
        '<|python_tag|>brave_search.search(query="x")',
        '<|python_tag|>brave_search.call(query="unterminated)',
    ],
)
def test_builtin_calls_that_are_not_plain_literals_stay_content(text: str) -> None:
    assert parse(text, tools("web_search")) == plain(text.removeprefix("<|python_tag|>"))


def test_a_builtin_that_was_not_offered_is_not_called() -> None:
    text = '<|python_tag|>wolfram_alpha.call(query="2+2")<|eom_id|>'
    assert parse(text, tools("web_search")) == plain('wolfram_alpha.call(query="2+2")')


# --- code interpreter ----------------------------------------------------------------


def test_python_tag_with_code_is_a_code_interpreter_call() -> None:
    code = (
        "def is_prime(n):\n    return n > 1 and all(n % i for i in range(2, n))\n\n"
        "print(is_prime(7))"
    )
    text = f"<|python_tag|>{code}<|eom_id|>"
    assert parse(text, stop_reason="end_of_message") == only_call("code_interpreter", code=code)


def test_a_builtin_call_that_was_not_offered_is_code_when_code_interpreter_is() -> None:
    text = '<|python_tag|>brave_search.call(query="x")'
    assert parse(text, tools("code_interpreter")) == only_call(
        "code_interpreter", code='brave_search.call(query="x")'
    )


def test_python_tag_text_without_code_interpreter_stays_content() -> None:
    text = "<|python_tag|>I think the answer is 42.<|eot_id|>"
    assert parse(text, tools("web_search", "get_weather")) == plain("I think the answer is 42.")


def test_code_cut_off_by_max_tokens_is_not_run() -> None:
    text = "<|python_tag|>for i in range(10):\n    print("
    parsed = parse(text, stop_reason="out_of_tokens")
    assert parsed == plain("for i in range(10):\n    print(")


def test_text_before_the_python_tag_is_content() -> None:
    text = 'Let me look that up.<|python_tag|>brave_search.call(query="Paris events")<|eom_id|>'
    assert parse(text) == ParsedOutput(
        content="Let me look that up.",
        tool_calls=[ToolCall(tool_name="web_search", arguments={"query": "Paris events"})],
    )


# --- custom tools: JSON --------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        '\n  {"name": "get_weather",\n "parameters": {"city": "Paris"}}  \n<|eot_id|>',
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
        '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|eom_id|>",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}',
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    ],
)
def test_json_custom_tool_calls(text: str) -> None:
    assert parse(text) == only_call("get_weather", city="Paris")


def test_json_call_without_parameters_has_no_arguments() -> None:
    assert parse('{"name": "get_weather"}') == only_call("get_weather")


def test_json_call_of_image_gen() -> None:
    text = '{"name": "image_gen", "parameters": {"query": "a lighthouse at dusk"}}'
    assert parse(text) == only_call("image_gen", query="a lighthouse at dusk")


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_stock_price", "parameters": {"ticker": "META"}}',  # not offered
        '{"name": "get_weather", "parameters": {"city": "Paris"}',  # malformed
        '{"name": "get_weather", "parameters": {"city": Paris}}',  # malformed
        '{"name": "get_weather", "parameters": {"t": NaN}}',  # not JSON
        '{"name": "get_weather", "parameters": "city=Paris"}',
        '{"name": 42, "parameters": {}}',
        '{"type": "object", "name": "get_weather", "parameters": {}}',
        '{"name": "get_weather", "parameters": {}} and then some text',
        '["get_weather", {"city": "Paris"}]',
        '{"city": "Paris"}',
    ],
)
def test_json_that_is_not_a_call_of_an_offered_tool_stays_content(text: str) -> None:
    assert parse(text) == plain(text)


def test_json_calls_need_a_custom_tool_offer() -> None:
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert parse(text, tools("web_search")) == plain(text)
    assert parse(text, []) == plain(text)


# --- custom tools: function tag ------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '<function=get_weather>{"city": "Paris"}</function>',
        '<function=get_weather>{"city": "Paris"}</function><|eot_id|>',
        '<function=get_weather>{"city": "Paris"}<|eot_id|>',
        ' <function=get_weather> {"city": "Paris"} </function>\n',
        '<|python_tag|><function=get_weather>{"city": "Paris"}</function><|eom_id|>',
    ],
)
def test_function_tag_calls(text: str) -> None:
    assert parse(text) == only_call("get_weather", city="Paris")


def test_text_around_a_function_tag_is_content() -> None:
    text = 'Checking. <function=get_weather>{"city": "Rome"}</function> One moment.'
    assert parse(text) == ParsedOutput(
        content="Checking.\nOne moment.",
        tool_calls=[ToolCall(tool_name="get_weather", arguments={"city": "Rome"})],
    )


@pytest.mark.parametrize(
    "text",
    [
        '<function=get_stock_price>{"ticker": "META"}</function>',  # not offered
        '<function=get_weather>{"city": "Paris"</function>',  # malformed
        "<function=get_weather>city=Paris</function>",
        '<function=get_weather>["Paris"]</function>',
    ],
)
def test_function_tags_that_are_not_calls_stay_content(text: str) -> None:
    assert parse(text) == plain(text)


# --- plain replies -------------------------------------------------------------------


def test_plain_reply_keeps_its_text_without_the_stop_token() -> None:
    assert parse("The capital of France is Paris.<|eot_id|>") == plain(
        "The capital of France is Paris."
    )
    assert parse("  Spaces are kept. ") == plain("  Spaces are kept. ")
    assert parse("Cut off mid", stop_reason="out_of_tokens") == plain("Cut off mid")


def test_nothing_is_a_call_when_no_tools_are_offered() -> None:
    text = '<|python_tag|>brave_search.call(query="x")'
    assert parse(text, []) == plain('brave_search.call(query="x")')


# --- stop reasons --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "spec"),
    [
        ("end_of_turn", "finished_ok"),
        ("end_of_message", "finished_ok"),
        ("out_of_tokens", "max_tokens"),
    ],
)
def test_stop_reasons_map_to_the_spec(engine: str, spec: str) -> None:
    assert to_spec_stop_reason(engine) == spec


def test_unknown_stop_reason_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown engine stop reason"):
        to_spec_stop_reason("length")
    with pytest.raises(ValueError, match="unknown engine stop reason"):
        parse("hi", stop_reason="stop")


# --- streaming -----------------------------------------------------------------------


def stream(detector: ToolCallStreamDetector, deltas: Sequence[str]) -> list[str]:
    return [detector.feed(delta) for delta in deltas]


def test_plain_stream_passes_through_after_the_first_word() -> None:
    detector = ToolCallStreamDetector(ALL_TOOLS)
    assert stream(detector, ["  ", "The", " answer", " is 4."]) == [
        "",
        "  The",
        " answer",
        " is 4.",
    ]
    assert not detector.could_be_tool_call
    assert detector.finish(stop_reason="end_of_turn") == plain("")


def test_python_tag_stream_is_held_and_parsed_at_the_end() -> None:
    detector = ToolCallStreamDetector(ALL_TOOLS)
    deltas = ["<|python_tag|>", "brave", "_search.call(", 'query="SF")']
    assert stream(detector, deltas) == ["", "", "", ""]
    assert detector.could_be_tool_call
    assert detector.text == "".join(deltas)
    assert detector.finish(stop_reason="end_of_message") == only_call("web_search", query="SF")


def test_function_tag_prefix_is_held_while_it_could_still_match() -> None:
    detector = ToolCallStreamDetector(ALL_TOOLS)
    assert stream(detector, ["<func", "tion=get_weather>", '{"city": "Oslo"}</function>']) == [
        "",
        "",
        "",
    ]
    assert detector.finish(stop_reason="end_of_turn") == only_call("get_weather", city="Oslo")


def test_a_held_reply_that_is_not_a_call_comes_out_as_content_at_the_end() -> None:
    detector = ToolCallStreamDetector(ALL_TOOLS)
    assert stream(detector, ["{", '"answer": 4}']) == ["", ""]
    assert detector.finish(stop_reason="end_of_turn") == plain('{"answer": 4}')


def test_a_prefix_that_stops_matching_is_released() -> None:
    detector = ToolCallStreamDetector(ALL_TOOLS)
    assert stream(detector, ["<", "b>bold</b>"]) == ["", "<b>bold</b>"]
    assert not detector.could_be_tool_call


def test_builtin_only_tools_do_not_hold_json() -> None:
    detector = ToolCallStreamDetector(tools("web_search"))
    assert stream(detector, ['{"a": 1}']) == ['{"a": 1}']


def test_without_tools_nothing_is_held() -> None:
    detector = ToolCallStreamDetector([])
    assert not detector.could_be_tool_call
    assert stream(detector, ["<|python_tag|>", "x"]) == ["<|python_tag|>", "x"]
