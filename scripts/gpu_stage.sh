#!/usr/bin/env bash
# Run HERE (a machine with PyPI access) before the GPU run: puts into .gpu/ (ignored by git) what
# the bare GPU machine cannot fetch: a copy of the ComfyUI checkout and the two wheels its image
# lacks (torchsde + trampoline: ComfyUI's k-diffusion samplers import them). PyAV, which ComfyUI
# imports for its video types only, is stubbed on the GPU machine instead (its wheel is ~40 MB).
# Then, with the device tool: command "bash scripts/gpu_bench.sh", carry [".gpu"], timeout_s 600.
#
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/gpu_stage.sh
set -euo pipefail
cd "$(dirname "$0")/.."
COMFY="${COMFYUI_PATH:?set COMFYUI_PATH to the ComfyUI checkout to benchmark (v0.3.64 was used)}"
PY="${PYTHON:-python3}"

rm -rf .gpu
mkdir -p .gpu/ComfyUI .gpu/wheels
# ComfyUI without its git history, tests and caches (~16 MB)
tar -C "$COMFY" --exclude=.git --exclude=tests --exclude=tests-unit --exclude=__pycache__ --exclude='*.pyc' \
    --exclude=output --exclude=temp --exclude=user -cf - . | tar -C .gpu/ComfyUI -xf -
git -C "$COMFY" rev-parse --short=10 HEAD > .gpu/ComfyUI/COMFYUI_COMMIT 2>/dev/null || echo unknown > .gpu/ComfyUI/COMFYUI_COMMIT
commit="$(git rev-parse --short=10 HEAD)"
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit+uncommitted changes"
echo "$commit" > .gpu/PACK_COMMIT

# wheels for the GPU image's Python (3.12, x86-64; both are pure Python)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels \
    torchsde==0.2.6 trampoline==0.1.2

tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
staged=$(du -sb .gpu | cut -f1)
echo "staged .gpu/: ComfyUI $(cat .gpu/ComfyUI/COMFYUI_COMMIT), pack $commit; tracked files $((tracked >> 20)) MiB" \
     "+ .gpu $((staged >> 20)) MiB of the 64 MiB the device tool carries"
[ $((tracked + staged)) -lt $((60 << 20)) ] || { echo "too big for the device tool (64 MiB)"; exit 1; }
