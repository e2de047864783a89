"""`image_gen` through the OpenAI Images API (or any server speaking it): `POST {url}` with
a Bearer key and `{"model", "prompt", "n": 1, "size"}`; the image comes back base64 in
`data[0].b64_json` and becomes the response's attachment as a `data:` URL.

`response_format: "b64_json"` is sent to DALL·E models only: the GPT image models always
answer base64 and refuse the parameter. The image's type is read from its first bytes
(PNG, JPEG or WebP), not trusted from the provider."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

from corral.agents.protocols import ToolFailed, ToolUnavailable
from corral.agents.tools.provider_http import request_json
from corral.api.common import Attachment, ToolCall, ToolResponse
from corral.config import Settings

NAME: Final = "image_gen"
MAX_PROMPT_CHARS: Final = 4000
MAX_RESPONSE_BYTES: Final = 32 << 20  # a 1024x1024 PNG is ~2-3 MB, ~4 MB as base64
DEFAULT_SIZE: Final = "1024x1024"
_SIGNATURES: Final = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)


class ImageGenTool:
    def __init__(
        self,
        *,
        api_key: str | None,
        url: str,
        model: str,
        timeout_s: float,
        size: str = DEFAULT_SIZE,
    ) -> None:
        self._api_key = api_key
        self._url = url
        self._model = model
        self._timeout_s = timeout_s
        self._size = size

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageGenTool:
        return cls(
            api_key=settings.image_gen_api_key,
            url=settings.image_gen_url,
            model=settings.image_gen_model,
            timeout_s=settings.tool_timeout_s,
        )

    @property
    def name(self) -> str:
        return NAME

    def ensure_available(self) -> None:
        if not self._api_key:
            raise ToolUnavailable(
                "image_gen is unavailable: no image generation API key is configured "
                "(set CORRAL_IMAGE_GEN_API_KEY)"
            )

    async def run(self, call: ToolCall) -> ToolResponse:
        self.ensure_available()
        prompt = call.arguments.get("query", call.arguments.get("prompt"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise ToolFailed("image_gen needs a non-empty string argument 'query'")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ToolFailed(f"the image prompt is longer than {MAX_PROMPT_CHARS} characters")
        request: dict[str, Any] = {
            "model": self._model,
            "prompt": prompt.strip(),
            "n": 1,
            "size": self._size,
        }
        if self._model.startswith("dall-e"):
            request["response_format"] = "b64_json"
        answer = await request_json(
            "POST",
            self._url,
            tool=NAME,
            headers={"Authorization": f"Bearer {self._api_key}"},
            json_body=request,
            timeout_s=self._timeout_s,
            max_bytes=MAX_RESPONSE_BYTES,
        )
        encoded = _first_image(answer)
        mime_type = _image_type(encoded)
        attachment = Attachment(url=f"data:{mime_type};base64,{encoded}", mime_type=mime_type)
        return ToolResponse(tool_name=NAME, content=attachment)


def _first_image(answer: dict[str, Any]) -> str:
    data = answer.get("data")
    if not isinstance(data, list):
        raise ToolFailed("image_gen: the provider's answer has no 'data' list")
    if not data:
        raise ToolFailed("image_gen: the provider returned no image (no results)")
    first = data[0]
    encoded = first.get("b64_json") if isinstance(first, dict) else None
    if not isinstance(encoded, str) or not encoded:
        raise ToolFailed("image_gen: the provider's answer has no base64 image ('b64_json')")
    return encoded


def _image_type(encoded: str) -> str:
    try:
        head = base64.b64decode(encoded[:64], validate=True)
        base64.b64decode(encoded, validate=True)  # the whole image, not only its start
    except (binascii.Error, ValueError):
        raise ToolFailed("image_gen: the provider's image is not valid base64") from None
    for signature, mime_type in _SIGNATURES:
        if head.startswith(signature):
            return mime_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    raise ToolFailed("image_gen: the provider's answer is not a PNG, JPEG or WebP image")
