"""One small error hierarchy. The CLI prints ``error: <message>`` for any of these."""


class DdpmRtError(Exception):
    """Base class of every error this package raises on purpose."""


class BundleError(DdpmRtError):
    """A bundle is missing, malformed, or its files do not match the manifest."""


class BackendError(DdpmRtError):
    """An inference backend could not be created or failed to run a graph."""


class InputError(DdpmRtError):
    """A user-supplied value (prompt, flag, data file, output path) is unusable."""


class CheckpointError(DdpmRtError):
    """A training checkpoint is missing or malformed."""
