"""build_tools: the four built-in tools by name, built without probing anything."""

from __future__ import annotations

import pytest

from corral.agents.protocols import ToolUnavailable
from corral.agents.tools import build_tools
from corral.config import Settings


def test_all_four_tools_by_their_spec_names() -> None:
    tools = build_tools(Settings(code_interpreter_python="/nonexistent/python3"))
    assert sorted(tools) == ["code_interpreter", "image_gen", "math", "web_search"]
    assert all(tools[name].name == name for name in tools)
    tools["math"].ensure_available()
    # Building did not fail; each tool says it cannot run only when asked.
    with pytest.raises(ToolUnavailable, match="CORRAL_WEB_SEARCH_API_KEY"):
        tools["web_search"].ensure_available()
    with pytest.raises(ToolUnavailable, match="CORRAL_IMAGE_GEN_API_KEY"):
        tools["image_gen"].ensure_available()
    with pytest.raises(ToolUnavailable, match="was not found"):
        tools["code_interpreter"].ensure_available()


def test_configured_keys_make_the_provider_tools_available() -> None:
    tools = build_tools(Settings(web_search_api_key="k1", image_gen_api_key="k2"))
    tools["web_search"].ensure_available()
    tools["image_gen"].ensure_available()
