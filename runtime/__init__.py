"""ddpm-rt: a torch-free runtime for a small text-to-image DDPM model."""

from .bundle import Bundle
from .errors import BackendError, BundleError, DdpmRtError, InputError
from .pipeline import GenerateConfig, Generator
from .schedule import NoiseSchedule, ScheduleConfig

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Bundle",
    "BundleError",
    "DdpmRtError",
    "GenerateConfig",
    "Generator",
    "InputError",
    "NoiseSchedule",
    "ScheduleConfig",
    "__version__",
]
