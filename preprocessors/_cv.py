"""Import OpenCV lazily, from whichever distribution provides the `cv2` module.

The project depends on `opencv-python`, but `opencv-python-headless`, `opencv-contrib-python` and
`opencv-contrib-python-headless` all install the same `cv2` module and we only use the core
`imgproc` functions every one of them has (no GUI, no contrib). The import happens on first use, not
when the package is imported, so loading the node pack stays cheap and a missing OpenCV is reported
by the node that needs it instead of breaking ComfyUI's start-up.
"""

from __future__ import annotations

from .errors import PreprocessorError

_cv2 = None

_FIX = (
    "install one OpenCV distribution into the Python that runs ComfyUI, e.g. "
    "`python -m pip install opencv-python` (or opencv-python-headless; either works)"
)


def cv2():
    """The `cv2` module; raises PreprocessorError with the fix when OpenCV is missing or broken."""
    global _cv2
    if _cv2 is None:
        try:
            import cv2 as module
        except ImportError as e:  # also a broken binary (missing libGL, ...): ImportError too
            raise PreprocessorError(f"OpenCV (`cv2`) could not be imported ({e}); {_FIX}") from e
        # Installing two OpenCV distributions and removing one leaves a `cv2` folder without the
        # compiled module: it imports, but has none of the functions.
        if not hasattr(module, "Canny") or not hasattr(module, "resize"):
            where = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))
            raise PreprocessorError(
                f"the `cv2` module found at {where} is incomplete (usually two OpenCV distributions were "
                "installed and one was uninstalled over the other); reinstall it: `python -m pip uninstall -y "
                "opencv-python opencv-python-headless` then `python -m pip install opencv-python`"
            )
        _cv2 = module
    return _cv2


_has_lsd = None


def has_lsd() -> bool:
    """True when this OpenCV build ships the LSD line detector (absent in 3.4.6 - 4.5.0)."""
    global _has_lsd
    if _has_lsd is None:
        cv = cv2()
        try:
            cv.createLineSegmentDetector()
            _has_lsd = True
        except (AttributeError, cv.error):
            _has_lsd = False
    return _has_lsd
