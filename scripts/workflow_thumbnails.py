"""Make the template browser's thumbnails (`workflows/<name>.jpg`) from captures of the real front end.

    CNCORE_SCREENSHOTS=/tmp/shots COMFYUI_PATH=... COMFYUI_PYTHON=... \\
        flock /tmp/comfyui.lock .venv/bin/python -m pytest tests/test_browser.py
    python scripts/workflow_thumbnails.py /tmp/shots/pinned   # the pinned front end's captures

tests/test_browser.py saves `<name>_canvas.png` for every workflow: the canvas of ComfyUI's front end
after the workflow was dropped on it and its Preprocessors' "Preview hint" pressed (the hint shows in
the node). This scales each to THUMB_WIDTH px and writes it as JPEG beside the workflow, the name the
template browser asks for (`/api/workflow_templates/<pack folder>/<name>.jpg`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
THUMB_WIDTH = 768


def main(shots: str) -> int:
    missing = []
    for wf in sorted(WORKFLOWS.glob("*.json")):
        capture = Path(shots) / f"{wf.stem}_canvas.png"
        if not capture.is_file():
            missing.append(capture.name)
            continue
        im = Image.open(capture).convert("RGB")
        im = im.resize((THUMB_WIDTH, round(im.height * THUMB_WIDTH / im.width)), Image.Resampling.LANCZOS)
        im.save(wf.with_suffix(".jpg"), quality=85, optimize=True)
        print(f"{wf.with_suffix('.jpg').name}: {im.width}x{im.height}")
    if missing:
        print("no capture for: " + ", ".join(missing), file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
