"""Host-independent ControlNet core: the control families, the loader, the runtime. Never imports ComfyUI.

The public API, in one place:

    from comfyui_controlnet_core.controlnet_core import (
        load_controlnet, inspect_controlnet, save_controlnet, Control, ControlSettings, ControlStack,
    )
"""

from .config import PRESETS, SD15, SD21, SDXL, AdapterConfig, ControlNetConfig
from .control import Control, ControlModel, ControlSettings, ControlStack
from .errors import ControlNetError, InputError, LoadError, UnsupportedFamilyError
from .host import StepRequest
from .loader import ModelInfo, infer_config, inspect_controlnet, load_controlnet, save_controlnet
from .model import ControlNet
from .control_lora import ControlLoRA
from .lllite import ControlNetLLLite
from .t2i_adapter import T2IAdapter
from .union import CONTROL_TYPES, UnionControlNet

__all__ = [
    "PRESETS", "SD15", "SD21", "SDXL", "ControlNetConfig",
    "Control", "ControlModel", "ControlSettings", "ControlStack", "StepRequest",
    "ControlNetError", "InputError", "LoadError", "UnsupportedFamilyError",
    "ControlNet", "AdapterConfig", "T2IAdapter", "ControlLoRA", "UnionControlNet", "CONTROL_TYPES", "ControlNetLLLite",
    "ModelInfo", "load_controlnet", "inspect_controlnet", "save_controlnet", "infer_config",
]
