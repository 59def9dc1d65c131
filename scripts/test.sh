#!/usr/bin/env bash
# Fresh machine -> green tests: venv, CPU torch pinned (a bare `torch` would pull a multi-GB CUDA
# build), the package with its `test` extra, then pytest. pytest's exit 5 ("no tests ran") fails
# the script like any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" "torch==2.13.0"
exec "$VENV/bin/python" -m pytest -q "$@"
