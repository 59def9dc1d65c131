"""Errors users see. Each message is a sentence that says what is wrong and how to fix it."""


class ControlNetError(ValueError):
    """Base of every error this package raises on purpose."""


class LoadError(ControlNetError):
    """A file that cannot be loaded as a supported ControlNet (names the file and the reason)."""


class UnsupportedFamilyError(LoadError):
    """A recognised control model family that this version does not run (T2I-Adapter, ...)."""


class InputError(ControlNetError):
    """Tensors or settings handed to a ControlNet or control that fit no rule."""
