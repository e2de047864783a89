"""Where vLLM replicas find their Python: vLLM runs in an environment of its own
(scripts/setup-vllm.sh builds `.venv-vllm` beside the code), because its pins (FastAPI
below 0.137, setuptools 77.0.3, CUDA builds of torchvision/torchaudio/torchcodec) would
hold the control plane's environment back. Ray starts an `engine: vllm` replica with that
env's interpreter (`runtime_env` `py_executable`); it must have the same Python and Ray
as the cluster."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

# The repository's own env, where scripts/setup-vllm.sh puts it by default.
DEFAULT_VLLM_PYTHON: Final = Path(__file__).resolve().parent.parent / ".venv-vllm/bin/python"


class VLLMEnvironmentMissing(ValueError):
    """`engine: vllm` asked for, but no vLLM environment is there to run it."""


def vllm_python(configured: Path | None = None) -> Path:
    """The interpreter vLLM replicas run with: `configured` (CORRAL_VLLM_PYTHON) or the
    repository's `.venv-vllm`; VLLMEnvironmentMissing, saying how to build one, if it is
    not an executable file."""
    path = configured if configured is not None else DEFAULT_VLLM_PYTHON
    if not (path.is_file() and os.access(path, os.X_OK)):
        where = "CORRAL_VLLM_PYTHON" if configured is not None else "the default"
        raise VLLMEnvironmentMissing(
            f"engine: vllm runs in its own Python environment, and {path} ({where}) is not "
            "an executable Python: build one with scripts/setup-vllm.sh, or set "
            "CORRAL_VLLM_PYTHON to one with vllm and the cluster's Ray"
        )
    return path
