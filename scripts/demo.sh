#!/usr/bin/env bash
# Fresh machine -> the demo: venv, CPU torch pinned, the package, then the demo command.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e . "torch==2.13.0"
exec "$VENV/bin/python" -m comfyui_controlnet_core demo "$@"
