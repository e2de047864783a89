#!/usr/bin/env bash
# Sets everything up, then runs the linters, the type checker and the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow" -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

ruff check .
ruff format --check .
mypy
# The slowest tests are listed at the end, so a test that grows slow is seen in CI.
python -m pytest --durations=25 "$@"
