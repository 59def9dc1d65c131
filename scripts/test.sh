#!/usr/bin/env bash
# Fresh machine -> green tests: .venv with CPU torch and the package with its `test` extra
# (scripts/venv.sh: one pip run, skipped once done), then pytest with the given arguments.
# pytest's exit 5 ("no tests ran") fails the script like any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="test,annotators"
source scripts/venv.sh
exec "$PY" -m pytest -q "$@"
