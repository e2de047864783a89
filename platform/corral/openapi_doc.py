"""The app's own OpenAPI document, committed as `corral/openapi.json` (package data).

It is what clients, the conformance test (against the Llama Stack spec) and the API tests'
response validator read, so it lives in the repository rather than only in a running
server. A test checks that it equals `create_app(...).openapi()`; after changing a route
or an API model, regenerate it with `python -m corral.openapi_doc --write`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

DOCUMENT_NAME = "openapi.json"
REGENERATE = "python -m corral.openapi_doc --write"


def build() -> dict[str, Any]:
    """The document the app serves. No database or Ray is touched: the document depends
    only on the routes and models, not on settings."""
    from corral.app import create_app
    from corral.config import Settings

    with tempfile.TemporaryDirectory(prefix="corral-openapi-") as home:
        document: dict[str, Any] = create_app(Settings(home=Path(home))).openapi()
    return document


def render(document: dict[str, Any]) -> str:
    """The committed spelling: key order as FastAPI writes it, two-space indent."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def committed_path() -> Path:
    """Where the committed document is in this source tree (for --write)."""
    return Path(__file__).with_name(DOCUMENT_NAME)


def committed() -> dict[str, Any]:
    """The committed document, read as package data (works from a wheel too)."""
    text = resources.files("corral").joinpath(DOCUMENT_NAME).read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m corral.openapi_doc", description="Print, check or rewrite openapi.json."
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"rewrite {committed_path()}")
    action.add_argument(
        "--check", action="store_true", help="exit 1 if the committed document is stale"
    )
    args = parser.parse_args(argv)
    text = render(build())
    if args.write:
        committed_path().write_text(text, encoding="utf-8")
        print(f"wrote {committed_path()}")
        return 0
    if args.check:
        path = committed_path()
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
