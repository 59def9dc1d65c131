"""ComfyUI ControlNet Core: a ComfyUI custom-node pack, and the `comfyui_controlnet_core` package.

Importing this does no heavy work (no model load, no GPU init) and never needs ComfyUI.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
