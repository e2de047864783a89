"""`web_search` through the Brave Search API (Llama 3.1 calls it
`brave_search.call(query=...)`): `GET {url}?q=...&count=N` with the key in
`X-Subscription-Token`; the answer's `web.results` become the response, as JSON text of
their titles, URLs and descriptions. No results is said in so many words."""

from __future__ import annotations

import html
import json
import re
from typing import Any, Final

from corral.agents.protocols import ToolFailed, ToolUnavailable
from corral.agents.tools.provider_http import request_json
from corral.api.common import ToolCall, ToolResponse
from corral.config import Settings

NAME: Final = "web_search"
MAX_QUERY_CHARS: Final = 400  # Brave refuses queries over 400 characters
MAX_RESPONSE_BYTES: Final = 2 << 20
_TAG: Final = re.compile(r"<[^>]*>")  # Brave marks matches with <strong>


class WebSearchTool:
    def __init__(self, *, api_key: str | None, url: str, timeout_s: float, count: int = 5) -> None:
        self._api_key = api_key
        self._url = url
        self._timeout_s = timeout_s
        self._count = count

    @classmethod
    def from_settings(cls, settings: Settings) -> WebSearchTool:
        return cls(
            api_key=settings.web_search_api_key,
            url=settings.web_search_url,
            timeout_s=settings.tool_timeout_s,
        )

    @property
    def name(self) -> str:
        return NAME

    def ensure_available(self) -> None:
        if not self._api_key:
            raise ToolUnavailable(
                "web_search is unavailable: no Brave Search API key is configured "
                "(set CORRAL_WEB_SEARCH_API_KEY)"
            )

    async def run(self, call: ToolCall) -> ToolResponse:
        self.ensure_available()
        assert self._api_key is not None
        query = call.arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ToolFailed("web_search needs a non-empty string argument 'query'")
        query = query.strip()
        if len(query) > MAX_QUERY_CHARS:
            raise ToolFailed(f"the search query is longer than {MAX_QUERY_CHARS} characters")
        answer = await request_json(
            "GET",
            self._url,
            tool=NAME,
            headers={"X-Subscription-Token": self._api_key, "Accept": "application/json"},
            params={"q": query, "count": str(self._count)},
            timeout_s=self._timeout_s,
            max_bytes=MAX_RESPONSE_BYTES,
        )
        results = _results(answer)
        body: dict[str, Any] = {"query": query, "results": results}
        if not results:
            body["note"] = "no results"
        return ToolResponse(tool_name=NAME, content=json.dumps(body, ensure_ascii=False))


def _results(answer: dict[str, Any]) -> list[dict[str, str]]:
    """Brave leaves `web` out when nothing matched; anything else misshapen is an error."""
    web = answer.get("web")
    if web is None:
        if answer.get("type") != "search":
            raise ToolFailed("web_search: the provider's answer is not a Brave search response")
        return []
    items = web.get("results") if isinstance(web, dict) else None
    if not isinstance(items, list):
        raise ToolFailed("web_search: the provider's answer has no list of web results")
    results = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            continue
        results.append(
            {
                "title": _text(item.get("title")),
                "url": item["url"],
                "description": _text(item.get("description")),
            }
        )
    return results


def _text(value: object) -> str:
    return html.unescape(_TAG.sub("", value)).strip() if isinstance(value, str) else ""
