"""Annotator networks in torch (imported only by the methods that need them, so importing
`preprocessors` stays numpy-only)."""
