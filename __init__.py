"""ComfyUI ControlNet Core: a ComfyUI custom-node pack, and the `comfyui_controlnet_core` package.

Importing this does no heavy work (no model load, no GPU init) and never needs ComfyUI: the nodes
import ComfyUI's modules only when they run. If a dependency is missing, one line is logged and
the pack registers no nodes instead of stopping ComfyUI's start-up.
"""

import logging

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as _e:  # pragma: no cover - exercised by a subprocess test
    logging.getLogger(__name__).error(
        "ComfyUI ControlNet Core is disabled: a dependency is missing (%s); install the pack's requirements "
        "(pip install torch safetensors numpy opencv-python pillow) and restart ComfyUI", _e
    )
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
