"""Fixtures of the serve_apps tests that more than one module shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve_apps.answering_model import build_answering_model


@pytest.fixture(scope="session")
def answering_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The head_dim-32 model trained to answer a few prompts (answering_model), built once."""
    return build_answering_model(tmp_path_factory.mktemp("answering") / "model")
