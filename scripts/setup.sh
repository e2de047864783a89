#!/usr/bin/env bash
# Creates .venv if it is missing and installs Corral (editable) with its test tools.
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "Corral needs Python 3.11 or newer (PYTHON=$PYTHON)" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

python -m pip install --quiet --upgrade pip
# torch goes first so nothing pulls a build we did not choose. The default is the CPU
# build; on a GPU machine set e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
# deepspeed comes as an sdist; its isolated build needs no torch (its C++/CUDA ops are
# compiled on first use, into TORCH_EXTENSIONS_DIR), and the torch above satisfies its
# dependency. pip caches the built wheel, so later runs do not build it again.
python -m pip install --quiet -e ".[test]"
# The env `engine: vllm` replicas run in (scripts/setup-vllm.sh says why it is separate):
# only when asked, it takes minutes and several GB. CI asks (.ci/run).
if [ "${CORRAL_SETUP_VLLM:-0}" = 1 ]; then
    PYTHON="$PYTHON" bash scripts/setup-vllm.sh
fi
