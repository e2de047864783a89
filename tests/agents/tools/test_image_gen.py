"""image_gen against a fake OpenAI Images API on loopback."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from corral.agents.protocols import ToolFailed, ToolUnavailable
from corral.agents.tools.image_gen import ImageGenTool
from corral.api.common import Attachment, ToolCall, ToolResponse
from corral.config import Settings

from .conftest import IMAGE_KEY, IMAGE_PATH, FakeProviders, tiny_png


def _tool(
    providers: FakeProviders, *, key: str | None = IMAGE_KEY, model: str = "gpt-image-1"
) -> ImageGenTool:
    return ImageGenTool(api_key=key, url=providers.image_url, model=model, timeout_s=5.0)


def _generate(tool: ImageGenTool, prompt: str = "a llama on a hill") -> ToolResponse:
    return asyncio.run(tool.run(ToolCall(tool_name="image_gen", arguments={"query": prompt})))


@pytest.mark.parametrize("model", ["gpt-image-1", "dall-e-3"])
def test_the_image_comes_back_as_a_data_url_attachment(
    providers: FakeProviders, model: str
) -> None:
    response = _generate(_tool(providers, model=model))
    assert response.tool_name == "image_gen"
    assert isinstance(response.content, Attachment)
    assert response.content.mime_type == "image/png"
    prefix = "data:image/png;base64,"
    assert response.content.url.startswith(prefix)
    assert base64.b64decode(response.content.url.removeprefix(prefix)) == tiny_png()
    # The response survives the spec model's own validation (URL pattern, printable).
    assert ToolResponse.model_validate(response.model_dump()) == response
    (request,) = providers.requests
    assert (request.method, request.path) == ("POST", IMAGE_PATH)
    assert request.headers["authorization"] == f"Bearer {IMAGE_KEY}"
    assert request.headers["content-type"] == "application/json"
    expected = {"model": model, "prompt": "a llama on a hill", "n": 1, "size": "1024x1024"}
    if model.startswith("dall-e"):
        expected["response_format"] = "b64_json"
    assert json.loads(request.body) == expected


def test_no_key_is_unavailable_naming_the_setting(providers: FakeProviders) -> None:
    tool = ImageGenTool.from_settings(
        Settings(image_gen_api_key=None, image_gen_url=providers.image_url)
    )
    with pytest.raises(ToolUnavailable, match="CORRAL_IMAGE_GEN_API_KEY"):
        tool.ensure_available()
    with pytest.raises(ToolUnavailable, match="CORRAL_IMAGE_GEN_API_KEY"):
        _generate(tool)
    assert providers.requests == []


def test_settings_carry_key_url_and_model(providers: FakeProviders) -> None:
    settings = Settings(
        image_gen_api_key=IMAGE_KEY,
        image_gen_url=providers.image_url,
        image_gen_model="gpt-image-1-mini",
    )
    assert isinstance(_generate(ImageGenTool.from_settings(settings)).content, Attachment)
    assert json.loads(providers.requests[0].body)["model"] == "gpt-image-1-mini"


def test_a_wrong_key_is_the_providers_message(providers: FakeProviders) -> None:
    with pytest.raises(ToolFailed, match="HTTP 401: Incorrect API key provided"):
        _generate(_tool(providers, key="sk-wrong"))


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("no_data", "no image"),
        ("not_image", "not a PNG, JPEG or WebP"),
        ("error500", "HTTP 500"),
        ("bad_json", "not JSON"),
        ("redirect", "not followed"),
    ],
)
def test_provider_failures_are_tool_failures(
    providers: FakeProviders, mode: str, message: str
) -> None:
    providers.mode = mode
    with pytest.raises(ToolFailed, match=message):
        _generate(_tool(providers))


def test_a_slow_provider_times_out(providers: FakeProviders) -> None:
    providers.mode = "slow"
    tool = ImageGenTool(
        api_key=IMAGE_KEY, url=providers.image_url, model="gpt-image-1", timeout_s=0.5
    )
    with pytest.raises(ToolFailed, match=r"did not answer within 0\.5 s"):
        _generate(tool)


@pytest.mark.parametrize(
    "arguments", [{}, {"query": "  "}, {"query": ["a"]}, {"query": "x" * 4001}]
)
def test_bad_arguments_fail_before_any_request(
    providers: FakeProviders, arguments: dict[str, object]
) -> None:
    with pytest.raises(ToolFailed, match=r"query|longer"):
        asyncio.run(_tool(providers).run(ToolCall(tool_name="image_gen", arguments=arguments)))  # type: ignore[arg-type]
    assert providers.requests == []
