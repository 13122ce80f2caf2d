#!/usr/bin/env bash
# Browser test tools: Debian's chromium (apt) and playwright-core (npm, no browser download) for
# tests/test_browser.py, and the newest ComfyUI frontend on the package index (pip, into
# tests/browser/frontends/<version>/; scripts/test.sh gives it to ComfyUI 0.33.0 as --front-end-root).
# Idempotent; run as root (CI) or with sudo available.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then  # Debian 12's nodejs is 18
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends nodejs npm
fi
# playwright-core never downloads a browser; the test points it at /usr/bin/chromium.
(cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
NEWEST_FRONTEND=1.58.1
frontend_dir="tests/browser/frontends/$NEWEST_FRONTEND"
if [ ! -f "$frontend_dir/comfyui_frontend_package/static/index.html" ]; then
    py=python3  # any Python with pip: a venv of scripts/dev-install.sh where there is one
    for venv in "${VENV033:-.venv-comfy033}" "${VENV:-.venv}"; do [ -x "$venv/bin/python" ] && py="$venv/bin/python" && break; done
    rm -rf "$frontend_dir"
    "$py" -m pip install -q --no-deps --target "$frontend_dir" "comfyui-frontend-package==$NEWEST_FRONTEND"
fi
echo "browser tools ready: $(chromium --version), playwright-core $(node -p "require('./tests/browser/node_modules/playwright-core/package.json').version"), frontend $NEWEST_FRONTEND in $frontend_dir"
