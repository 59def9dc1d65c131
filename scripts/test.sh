#!/usr/bin/env bash
# Fresh machine -> green tests: .venv with CPU torch and the package with its `test` extra
# (scripts/venv.sh: one pip run, skipped once done), then pytest with the given arguments.
# pytest's exit 5 ("no tests ran") fails the script like any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
# `annotators`: the network annotators' oracles (pyproject.toml); with them the whole suite ran in
# 3 min 46 s on the 2-core machine (652 passed, 103 skipped: COMFYUI_PATH / CUDA; 2026-12-08, incl. pip).
EXTRAS="test,annotators"
source scripts/venv.sh
exec "$PY" -m pytest -q "$@"
