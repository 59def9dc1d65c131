"""ComfyUI nodes of the pack. `node_defs` holds the four V1 node classes; `adapter` is the only
module that imports ComfyUI (lazily); `control_object` is our control object's logic."""

from .node_defs import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
