"""The vLLM env the `engine: vllm` tests need: they skip without one, saying how to build
it, unless CORRAL_REQUIRE_VLLM=1 (CI, which builds it), where they fail instead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve_apps.vllm_env import VLLMEnvironmentMissing, vllm_python

REQUIRE_VLLM = os.environ.get("CORRAL_REQUIRE_VLLM") == "1"


def vllm_python_or_skip() -> Path:
    """The vLLM env's python (CORRAL_VLLM_PYTHON or the repository's .venv-vllm)."""
    configured = os.environ.get("CORRAL_VLLM_PYTHON")
    try:
        return vllm_python(Path(configured) if configured else None)
    except VLLMEnvironmentMissing as exc:
        if REQUIRE_VLLM:
            pytest.fail(f"CORRAL_REQUIRE_VLLM=1 but {exc}")
        pytest.skip(f"no vLLM env (CORRAL_SETUP_VLLM=1 scripts/setup.sh builds it): {exc}")
