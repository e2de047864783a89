#!/usr/bin/env bash
# Sets everything up, then runs Corral's demo on the embedded defaults: the demo model is
# built on disk, `corral serve` starts a local Ray head and SQLite store under
# $CORRAL_HOME (default ~/.corral), and a short scripted session runs against the API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
corral demo "$@"
