"""Host-independent ControlNet core: model, loaders, runtime. Never imports ComfyUI."""

from .config import PRESETS, SD15, SD21, SDXL, ControlNetConfig
from .errors import ControlNetError, InputError, LoadError, UnsupportedFamilyError
from .loader import infer_config, load_controlnet, save_controlnet
from .model import ControlNet

__all__ = [
    "PRESETS", "SD15", "SD21", "SDXL", "ControlNetConfig",
    "ControlNetError", "InputError", "LoadError", "UnsupportedFamilyError",
    "ControlNet", "load_controlnet", "save_controlnet", "infer_config",
]
