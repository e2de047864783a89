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
# Two workers: the tests on the session's Ray cluster run on one of them, everything else
# beside them on the other (tests/conftest.py). CORRAL_TEST_WORKERS=0 runs in one process.
# The slowest tests are listed at the end, so a test that grows slow is seen in CI.
python -m pytest -n "${CORRAL_TEST_WORKERS:-2}" --dist loadgroup --durations=40 "$@"
