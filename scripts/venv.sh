# Sourced by test.sh and demo.sh: make "$VENV" (default .venv) once, with the CPU build of torch and
# this package (editable, plus the extras in $EXTRAS), in ONE pip run; later runs skip pip entirely
# while nothing it installed from has changed (a stamp in the venv records what was installed).
#
# Why an extra index: on Linux, PyPI's `torch` wheel is the multi-GB CUDA build. PyTorch's CPU index
# serves `torch==X+cpu`, which pip prefers to PyPI's `torch==X` (a local version sorts higher).
# TORCH_INDEX_URL overrides that index (a mirror); TORCH_INDEX_URL= (empty) uses only pip's own
# configuration. An index that does not answer within 10 s is skipped with a note, so an offline
# machine or CI that finds torch elsewhere (pip's find-links, a local mirror) is not slowed down.
TORCH_VERSION="2.13.0"
CONTROLNET_AUX_VERSION="0.0.10"
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"

[ -x "$PY" ] || python3 -m venv "$VENV"
_stamp="$VENV/.cncore-installed"
_key="torch==$TORCH_VERSION controlnet-aux==$CONTROLNET_AUX_VERSION pyproject=$(cksum < pyproject.toml | cut -d' ' -f1)"
# Installed already: the same line, or (no extras wanted) the same install with any extras.
if ! grep -qxF "$_key [$EXTRAS]" "$_stamp" 2>/dev/null && ! { [ -z "$EXTRAS" ] && grep -qF "$_key [" "$_stamp" 2>/dev/null; }; then
    _index=()
    if [ -n "$TORCH_INDEX_URL" ]; then
        if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)' \
                "$TORCH_INDEX_URL" 2>/dev/null; then
            _index=(--extra-index-url "$TORCH_INDEX_URL")
        else
            echo "note: $TORCH_INDEX_URL does not answer; torch==$TORCH_VERSION comes from pip's configured" \
                 "indexes (set TORCH_INDEX_URL to a reachable CPU wheel index if that pulls a CUDA build)" >&2
        fi
    fi
    _pkg="."
    [ -n "$EXTRAS" ] && _pkg=".[$EXTRAS]"
    "$PY" -m pip install -q --disable-pip-version-check "${_index[@]}" "torch==$TORCH_VERSION" -e "$_pkg"
    # The annotators' oracle: controlnet-aux without its requirements (they name opencv-python-headless,
    # which would shadow our opencv-python); the `annotators` extra brought the ones it imports.
    case ",$EXTRAS," in
        *,annotators,*) "$PY" -m pip install -q --disable-pip-version-check --no-deps "controlnet-aux==$CONTROLNET_AUX_VERSION" ;;
    esac
    { grep -F "$_key [" "$_stamp" 2>/dev/null || true; echo "$_key [$EXTRAS]"; } > "$_stamp.new"
    mv "$_stamp.new" "$_stamp"
fi
