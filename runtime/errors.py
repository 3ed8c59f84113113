"""One small error hierarchy. The CLI prints ``error: <message>`` for any of these."""

from __future__ import annotations


class DdpmRtError(Exception):
    """Base class of every error this package raises on purpose."""


class BundleError(DdpmRtError):
    """A bundle is missing, malformed, or its files do not match the manifest."""


class BackendError(DdpmRtError):
    """An inference backend could not be created or failed to run a graph."""


class InputError(DdpmRtError):
    """A user-supplied value (prompt, flag, data file, output path) is unusable.

    ``field``: the request field at fault, where one is (``GenerateConfig``'s field name,
    ``"prompt"``, ...): the server reports it as ``error.param``."""

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


class NumericalError(BackendError):
    """A graph produced NaN, Inf or an absurdly large value; nothing is written."""


class Cancelled(DdpmRtError):
    """A generate() callback returned False: the call stopped cleanly, nothing returned."""


class CheckpointError(DdpmRtError):
    """A training checkpoint is missing or malformed."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages can run for pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
