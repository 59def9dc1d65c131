#!/usr/bin/env bash
# Fresh machine -> the demo: .venv with CPU torch and the package (scripts/venv.sh: one pip run,
# skipped once done), then `python -m comfyui_controlnet_core demo` with the given arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=""
source scripts/venv.sh
exec "$PY" -m comfyui_controlnet_core demo "$@"
