"""Fake tool providers on loopback that speak the real HTTP protocols: the Brave Search
API (`GET /res/v1/web/search`, key in `X-Subscription-Token`) and the OpenAI Images API
(`POST /v1/images/generations`, Bearer key). Each records the requests it got; a test
switches `mode` to make it fail the ways real providers do."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

SEARCH_KEY = "brave-test-key"
IMAGE_KEY = "sk-image-test-key"
SEARCH_PATH = "/res/v1/web/search"
IMAGE_PATH = "/v1/images/generations"


def tiny_png() -> bytes:
    """A real 1x1 PNG (signature, IHDR, IDAT, IEND with their CRCs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeProviders:
    base_url: str
    mode: str = "ok"  # ok | empty | error500 | redirect | bad_json | slow | huge | no_data
    requests: list[Recorded] = field(default_factory=list)

    @property
    def search_url(self) -> str:
        return self.base_url + SEARCH_PATH

    @property
    def image_url(self) -> str:
        return self.base_url + IMAGE_PATH


def _brave(provider: FakeProviders, request: Recorded) -> tuple[int, Any]:
    if request.headers.get("x-subscription-token") != SEARCH_KEY:
        return 401, {
            "type": "ErrorResponse",
            "error": {
                "code": "SUBSCRIPTION_TOKEN_INVALID",
                "detail": "The provided subscription token is invalid.",
                "status": 401,
            },
        }
    query = request.query.get("q", [""])[0]
    if provider.mode == "empty":  # Brave leaves `web` out when nothing matched
        return 200, {"type": "search", "query": {"original": query}, "mixed": {"main": []}}
    count = int(request.query.get("count", ["20"])[0])
    results = [
        {
            "type": "search_result",
            "title": f"Result {n} about <strong>{query}</strong>",
            "url": f"https://example.org/{n}",
            "description": f"All about <strong>{query}</strong> &amp; more ({n})",
            "language": "en",
        }
        for n in range(1, 9)
    ][:count]
    return 200, {
        "type": "search",
        "query": {"original": query},
        "web": {"type": "search", "results": results},
    }


def _openai_images(provider: FakeProviders, request: Recorded) -> tuple[int, Any]:
    if request.headers.get("authorization") != f"Bearer {IMAGE_KEY}":
        return 401, {
            "error": {
                "message": "Incorrect API key provided.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    body = json.loads(request.body)
    unknown = set(body) - {"model", "prompt", "n", "size", "response_format", "quality"}
    if str(body.get("model", "")).startswith("gpt-image") and "response_format" in body:
        unknown.add("response_format")  # the GPT image models always answer base64
    if unknown or not isinstance(body.get("prompt"), str):
        return 400, {
            "error": {
                "message": f"Unknown parameter: {sorted(unknown)!r}.",
                "type": "invalid_request_error",
                "param": None,
                "code": "unknown_parameter",
            }
        }
    if provider.mode == "no_data":
        return 200, {"created": int(time.time()), "data": []}
    if provider.mode == "not_image":
        image = base64.b64encode(b"GIF89a definitely not png").decode()
    else:
        image = base64.b64encode(tiny_png()).decode()
    return 200, {"created": int(time.time()), "data": [{"b64_json": image}], "usage": {}}


@pytest.fixture
def providers() -> Iterator[FakeProviders]:
    holder: list[FakeProviders] = []

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            provider = holder[0]
            split = urlsplit(self.path)
            length = int(self.headers.get("content-length") or 0)
            request = Recorded(
                method=self.command,
                path=split.path,
                query=parse_qs(split.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=self.rfile.read(length),
            )
            provider.requests.append(request)
            if provider.mode == "slow":
                time.sleep(2)
            if provider.mode == "redirect":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if provider.mode == "error500":
                self._send(500, b'{"error": {"message": "The server had an error."}}')
                return
            if provider.mode == "bad_json":
                self._send(200, b"<html>gateway</html>")
                return
            if provider.mode == "huge":
                self._send(200, b"[" + b"0," * (3 << 20) + b"0]")
                return
            routes = {("GET", SEARCH_PATH): _brave, ("POST", IMAGE_PATH): _openai_images}
            route = routes.get((self.command, split.path))
            if route is None:
                self._send(404, b'{"error": {"message": "not found"}}')
                return
            status, value = route(provider, request)
            self._send(status, json.dumps(value).encode())

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # The client may stop reading (the size cap).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._handle()

        def do_POST(self) -> None:
            self._handle()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder.append(FakeProviders(base_url=f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()
