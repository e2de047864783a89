"""The committed OpenAPI document (corral/openapi.json) is the live app's, and the script
that regenerates it writes exactly that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral import openapi_doc
from corral.app import create_app
from corral.config import Settings


def test_the_committed_document_is_the_apps(tmp_path: Path) -> None:
    live = create_app(Settings(home=tmp_path)).openapi()
    assert openapi_doc.committed() == live, (
        "platform/corral/openapi.json is stale (a route or an API model changed): "
        f"run `{openapi_doc.REGENERATE}` and commit the result"
    )


def test_check_passes_on_the_committed_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert openapi_doc.main(["--check"]) == 0


def test_check_fails_on_a_stale_document_and_says_how_to_fix_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "openapi.json"
    stale.write_text(json.dumps({"openapi": "3.1.0", "paths": {}}))
    monkeypatch.setattr(openapi_doc, "committed_path", lambda: stale)
    assert openapi_doc.main(["--check"]) == 1
    assert openapi_doc.REGENERATE in capsys.readouterr().err


def test_write_rewrites_the_document(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tmp_path / "openapi.json"
    monkeypatch.setattr(openapi_doc, "committed_path", lambda: target)
    assert openapi_doc.main(["--write"]) == 0
    assert json.loads(target.read_text()) == openapi_doc.committed()
    assert openapi_doc.main(["--check"]) == 0
