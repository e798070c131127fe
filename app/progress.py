"""The one progress protocol every long-running analysis accepts.

An analysis calls ``progress(fraction, message)`` now and then; the callback may raise
:class:`app.errors.Cancelled` to stop it. ``None`` means nobody is listening.
"""

from collections.abc import Callable

ProgressFn = Callable[[float, str], None]


def report(progress: ProgressFn | None, fraction: float, message: str) -> None:
    """Call ``progress`` if one was given, clamping the fraction to [0, 1]."""
    if progress is not None:
        progress(min(1.0, max(0.0, float(fraction))), message)
