"""ComfyUI ControlNet Core: a ComfyUI custom-node pack, and the `comfyui_controlnet_core` package.

Importing this does no heavy work (no model load, no GPU init) and never needs ComfyUI: the nodes
import ComfyUI's modules only when they run. If a dependency is missing, one line is logged and
the pack registers no nodes instead of stopping ComfyUI's start-up. Inside ComfyUI (its `server`
module is loaded) the pack also adds its HTTP routes (nodes/routes.py) and serves web/ (the front-end
extension: per-method widgets, hint preview, the loader's model label).
"""

import logging
import sys

WEB_DIRECTORY = "./web"

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as _e:  # pragma: no cover - exercised by a subprocess test
    logging.getLogger(__name__).error(
        "ComfyUI ControlNet Core is disabled: a dependency is missing (%s); install the pack's requirements "
        "(pip install torch safetensors numpy opencv-python pillow aiohttp) and restart ComfyUI", _e
    )
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    if "server" in sys.modules:  # loaded by ComfyUI: add the routes; a failure costs the preview only
        try:
            from .nodes import routes as _routes

            _routes.register()
            from .nodes import adapter as _adapter

            _adapter.setup_annotators()  # models/annotators exists for ComfyUI from start-up
        except Exception as _e:  # pragma: no cover - depends on the host
            logging.getLogger(__name__).error(
                "ComfyUI ControlNet Core: the preview and model-info routes are off (%s: %s)", type(_e).__name__, _e
            )

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
