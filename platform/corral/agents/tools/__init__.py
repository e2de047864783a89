"""The built-in tools the server runs, built from settings. Each checks whether it can run
only when asked (`ensure_available`): building them never probes a sandbox or a provider.

    tools = build_tools(settings)      # {"math": ..., "code_interpreter": ..., ...}
    tools["web_search"].ensure_available()   # ToolUnavailable without a key
"""

from __future__ import annotations

from corral.agents.protocols import Tool
from corral.agents.tools.code_interpreter import CodeInterpreterTool
from corral.agents.tools.image_gen import ImageGenTool
from corral.agents.tools.math_tool import MathTool
from corral.agents.tools.web_search import WebSearchTool
from corral.config import Settings

__all__ = ["CodeInterpreterTool", "ImageGenTool", "MathTool", "WebSearchTool", "build_tools"]


def build_tools(settings: Settings) -> dict[str, Tool]:
    """The four built-in tools by their spec names."""
    tools: list[Tool] = [
        MathTool(),
        CodeInterpreterTool.from_settings(settings),
        WebSearchTool.from_settings(settings),
        ImageGenTool.from_settings(settings),
    ]
    return {tool.name: tool for tool in tools}
