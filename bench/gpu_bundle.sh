#!/usr/bin/env bash
# Unpacks what bench/gpu_check.py needs on a bare GPU machine beyond its torch,
# transformers, peft and accelerate: pydantic (the job config) with its compiled core, for
# CPython 3.12 on x86-64 Linux, at the versions this checkout's .venv resolved. The result,
# bench/.gpu-site (git-ignored, a few MB), is what the device tool carries; gpu_check.py
# puts it on sys.path itself. PYTHON_VERSION picks another CPython for the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

python=.venv/bin/python
[ -x "$python" ] || { echo "run scripts/setup.sh first" >&2; exit 1; }
site=bench/.gpu-site
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT

pins=()
for package in pydantic pydantic-core annotated-types typing-inspection; do
    pins+=("$package==$("$python" -c "import importlib.metadata as m; print(m.version('$package'))")")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "${PYTHON_VERSION:-3.12}" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$wheels" "${pins[@]}"
rm -rf "$site" && mkdir -p "$site"
for wheel in "$wheels"/*.whl; do
    "$python" -m zipfile -e "$wheel" "$site"
done
echo "$site: ${pins[*]} ($(du -sh "$site" | cut -f1))"
