#!/usr/bin/env bash
# The GPU part of issue 15 in one command, on the bare device machine (after scripts/gpu_stage.sh
# here): device tool `run` with command "bash scripts/gpu_bench.sh", carry [".gpu"], timeout_s 600.
# It installs the staged wheels, runs the CUDA tests, then benchmarks/bench_comfyui.py inside the
# staged ComfyUI, and writes everything under $OUT (4 files): gpu_bench.log, cuda_tests.log,
# bench_comfyui_<gpu>.md/.json. It ends by itself in about 8 minutes at most: the tests get at most
# TESTS_S seconds, the benchmark stops starting new cases after BENCH_BUDGET_S and is killed at
# BENCH_KILL_S; what it measured until then is in the .md/.json (written after every process).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_bench.log") 2>&1
T0=$(date +%s)
TESTS_S="${TESTS_S:-150}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-240}"
BENCH_KILL_S="${BENCH_KILL_S:-320}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
[ -d .gpu/ComfyUI ] && ls .gpu/wheels/*.whl > /dev/null || { echo "run scripts/gpu_stage.sh first and carry .gpu"; exit 2; }

# --- what the image lacks -------------------------------------------------------------------------
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 2
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import av" 2>/dev/null; then
    # PyAV: ComfyUI imports it at start-up for its video types (comfy_api); nothing here touches
    # video, so a stand-in that names the two classes imported at module level is enough
    mkdir -p /tmp/stubs/av/container /tmp/stubs/av/subtitles
    echo '"""Stand-in for PyAV (absent on this machine; the benchmark never touches video)."""' > /tmp/stubs/av/__init__.py
    echo 'class InputContainer: pass' > /tmp/stubs/av/container/__init__.py
    : > /tmp/stubs/av/subtitles/__init__.py
    echo 'class SubtitleStream: pass' > /tmp/stubs/av/subtitles/stream.py
    export PYTHONPATH="/tmp/stubs:$PYTHONPATH"
    echo "av: stubbed"
fi
# this checkout importable as the package the tests import
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/comfyui_controlnet_core
export PYTHONPATH="/tmp/pkg:$PYTHONPATH"

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

# --- CUDA tests -----------------------------------------------------------------------------------
timeout "$TESTS_S" "$PY" -m pytest -q -s -rA -m cuda -p no:cacheprovider tests/test_fast.py > "$OUT/cuda_tests.log" 2>&1
echo "CUDA tests: exit $? ($(tail -1 "$OUT/cuda_tests.log"))   [$(( $(date +%s) - T0 )) s]"

# --- the benchmark in ComfyUI ---------------------------------------------------------------------
timeout "$BENCH_KILL_S" "$PY" benchmarks/bench_comfyui.py --comfyui .gpu/ComfyUI --work /tmp/cncore_bench \
    --out "$OUT" --budget-s "$BENCH_BUDGET_S" "$@"
echo "benchmark: exit $?   [$(( $(date +%s) - T0 )) s]"
ls -la "$OUT"
sleep 1  # let tee finish gpu_bench.log before the device tool collects $OUT
