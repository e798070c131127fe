"""Errors the engine raises; callers (the service, scripts) turn them into messages."""


class AtlasError(Exception):
    """Base class of every error the engine raises on purpose."""


class UnsupportedModelError(AtlasError):
    """The model uses an operator or shape the engine cannot represent.

    The message names the operator and the node, so a user can see what to change.
    """


class InvalidInputError(AtlasError):
    """An input or parameter does not fit the model or the analysis."""


class Cancelled(AtlasError):
    """Raised from a progress callback to stop a running analysis."""
