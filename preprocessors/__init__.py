"""Hint preprocessors: numpy + OpenCV only (no torch, no weights, no downloads).

Cheap to import: OpenCV itself is imported on first use. See `registry.py` for `run` and the
parameter / resolution rules, `methods.py` for the algorithms.
"""

from .errors import PreprocessorError
from .methods import INPAINT_SENTINEL, canny
from .registry import METHODS, PARAMS, Method, Param, get_method, list_methods, method_inputs, register, run

__all__ = [
    "INPAINT_SENTINEL",
    "METHODS",
    "PARAMS",
    "Method",
    "Param",
    "PreprocessorError",
    "canny",
    "get_method",
    "list_methods",
    "method_inputs",
    "register",
    "run",
]
