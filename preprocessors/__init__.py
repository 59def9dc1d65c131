"""Hint preprocessors: numpy + OpenCV methods, and network annotators run by our own torch code
from weight files the user has (`nets/`); nothing is ever downloaded.

Cheap to import: numpy only; OpenCV is imported on first use, torch only by the network methods.
See `registry.py` for `run` and the parameter / resolution / weights rules, `methods.py` for the
weight-free algorithms, `nets/` for the networks.
"""

from .errors import PreprocessorError
from .methods import INPAINT_SENTINEL, canny
from .registry import (
    METHODS, PARAMS, Method, Param, Weights, get_method, list_methods, method_inputs, register, run, weights_file,
)

__all__ = [
    "INPAINT_SENTINEL",
    "METHODS",
    "PARAMS",
    "Method",
    "Param",
    "Weights",
    "PreprocessorError",
    "canny",
    "get_method",
    "list_methods",
    "method_inputs",
    "register",
    "run",
    "weights_file",
]
