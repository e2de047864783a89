"""web_search against a fake Brave Search API on loopback."""

from __future__ import annotations

import asyncio
import json

import pytest

from corral.agents.protocols import ToolFailed, ToolUnavailable
from corral.agents.tools.web_search import WebSearchTool
from corral.api.common import ToolCall
from corral.config import Settings

from .conftest import SEARCH_KEY, SEARCH_PATH, FakeProviders


def _tool(
    providers: FakeProviders, *, key: str | None = SEARCH_KEY, timeout_s: float = 5.0
) -> WebSearchTool:
    return WebSearchTool(api_key=key, url=providers.search_url, timeout_s=timeout_s, count=3)


def _search(tool: WebSearchTool, query: str = "llamas") -> str:
    response = asyncio.run(tool.run(ToolCall(tool_name="web_search", arguments={"query": query})))
    assert response.tool_name == "web_search"
    assert isinstance(response.content, str)
    return response.content


def test_results_come_back_as_json_with_the_key_and_query_sent(providers: FakeProviders) -> None:
    body = json.loads(_search(_tool(providers), "llama & alpaca"))
    assert body["query"] == "llama & alpaca"
    assert body["results"] == [
        {
            "title": f"Result {n} about llama & alpaca",
            "url": f"https://example.org/{n}",
            "description": f"All about llama & alpaca & more ({n})",
        }
        for n in (1, 2, 3)
    ]
    assert "note" not in body
    (request,) = providers.requests
    assert (request.method, request.path) == ("GET", SEARCH_PATH)
    assert request.query == {"q": ["llama & alpaca"], "count": ["3"]}
    assert request.headers["x-subscription-token"] == SEARCH_KEY
    assert request.headers["accept"] == "application/json"


def test_no_results_is_said_explicitly(providers: FakeProviders) -> None:
    providers.mode = "empty"
    body = json.loads(_search(_tool(providers)))
    assert body == {"query": "llamas", "results": [], "note": "no results"}


def test_no_key_is_unavailable_naming_the_setting(providers: FakeProviders) -> None:
    tool = WebSearchTool.from_settings(Settings(web_search_api_key=None))
    with pytest.raises(ToolUnavailable, match="CORRAL_WEB_SEARCH_API_KEY"):
        tool.ensure_available()
    with pytest.raises(ToolUnavailable, match="CORRAL_WEB_SEARCH_API_KEY"):
        _search(tool)
    assert providers.requests == []


def test_settings_carry_key_url_and_timeout(providers: FakeProviders) -> None:
    settings = Settings(web_search_api_key=SEARCH_KEY, web_search_url=providers.search_url)
    tool = WebSearchTool.from_settings(settings)
    tool.ensure_available()
    assert len(json.loads(_search(tool))["results"]) == 5  # the default count


def test_a_wrong_key_is_the_providers_message_without_the_key(providers: FakeProviders) -> None:
    with pytest.raises(
        ToolFailed, match="HTTP 401: The provided subscription token is invalid"
    ) as error:
        _search(_tool(providers, key="wrong-key"))
    assert "wrong-key" not in str(error.value)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("error500", "HTTP 500: The server had an error"),
        ("bad_json", "not JSON"),
        ("redirect", "redirect .*not followed"),
        ("huge", "larger than"),
    ],
)
def test_provider_failures_are_tool_failures(
    providers: FakeProviders, mode: str, message: str
) -> None:
    providers.mode = mode
    with pytest.raises(ToolFailed, match=message):
        _search(_tool(providers))
    assert len(providers.requests) == 1  # the redirect was not followed


def test_a_slow_provider_times_out(providers: FakeProviders) -> None:
    providers.mode = "slow"
    with pytest.raises(ToolFailed, match=r"did not answer within 0\.5 s"):
        _search(_tool(providers, timeout_s=0.5))


def test_an_unreachable_provider_is_a_tool_failure() -> None:
    tool = WebSearchTool(api_key=SEARCH_KEY, url="http://127.0.0.1:9/search", timeout_s=2)
    with pytest.raises(ToolFailed, match="could not reach the provider"):
        _search(tool)


@pytest.mark.parametrize("arguments", [{}, {"query": ""}, {"query": 3}, {"query": "x" * 401}])
def test_bad_arguments_fail_before_any_request(
    providers: FakeProviders, arguments: dict[str, object]
) -> None:
    with pytest.raises(ToolFailed, match="query"):
        asyncio.run(_tool(providers).run(ToolCall(tool_name="web_search", arguments=arguments)))  # type: ignore[arg-type]
    assert providers.requests == []
