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
if [ "${CORRAL_TEST_SPLIT:-1}" != 1 ]; then
    exec python -m pytest --durations=30 "$@"
fi
# Two pytest processes side by side, one per core: the tests on the session's Ray cluster
# in one, everything else in the other (tests/conftest.py says why). Their lines are
# prefixed [ray] / [other]; CORRAL_TEST_SPLIT=0 runs everything in one process.
CORRAL_TEST_SHARED_DIR=$(mktemp -d "${TMPDIR:-/tmp}/corral-tests-XXXXXX")
export CORRAL_TEST_SHARED_DIR
trap 'rm -rf "$CORRAL_TEST_SHARED_DIR"' EXIT
part() {
    CORRAL_TEST_PART=$1 python -m pytest --durations=30 "${@:2}" 2>&1 | sed -u "s/^/[$1] /"
}
part ray "$@" &
ray_pid=$!
other=0
part other "$@" || other=$?
ray=0
wait "$ray_pid" || ray=$?
echo "tests on the Ray cluster: exit $ray; the others: exit $other"
# 5 is pytest's "no tests collected": fine for one part (arguments may select only the
# other), not for both.
if [ "$ray" = 5 ] && [ "$other" = 5 ]; then exit 5; fi
for rc in "$ray" "$other"; do
    if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then exit "$rc"; fi
done
