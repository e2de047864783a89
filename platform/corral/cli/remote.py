"""What the commands that talk to a running server share: `--url`, the bearer key from
CORRAL_API_KEY, and the client (`connect`; tests swap it for one on a test app)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # the client imports httpx and pydantic: not for `corral --help`
    from corral.client import CorralClient

DEFAULT_URL = "http://127.0.0.1:8321"
API_KEY_ENV = "CORRAL_API_KEY"

UrlOption = Annotated[
    str, typer.Option(help=f"the Corral server; the bearer key comes from {API_KEY_ENV}")
]
PollOption = Annotated[float, typer.Option(hidden=True, help="seconds between polls")]


def connect(url: str) -> CorralClient:
    from corral.client import CorralClient

    return CorralClient(url, api_key=os.environ.get(API_KEY_ENV) or None)
