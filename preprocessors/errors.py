"""The one error class of the preprocessors package."""


class PreprocessorError(ValueError):
    """A preprocessor could not run; the message says what is wrong and how to fix it."""
