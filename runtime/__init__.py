"""ddpm-rt: a torch-free runtime for a small text-to-image DDPM model.

The public names below are imported on first use (PEP 562), so that ``import ddpm_rt``
(and the ``ddpm-rt`` command, which installs its signal handlers first) starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ddpm_rt.errors import (
    BackendError,
    BundleError,
    Cancelled,
    DdpmRtError,
    InputError,
    NumericalError,
)

__version__ = "0.1.0"

_LAZY = {
    "Bundle": ".bundle.bundle",
    "GenerateConfig": ".config",
    "Generator": ".generator",
    "StepInfo": ".progress",
    "NoiseSchedule": ".core.schedule",
    "ScheduleConfig": ".core.schedule",
}

__all__ = [
    "BackendError",
    "Bundle",
    "BundleError",
    "Cancelled",
    "DdpmRtError",
    "GenerateConfig",
    "Generator",
    "InputError",
    "NoiseSchedule",
    "NumericalError",
    "ScheduleConfig",
    "StepInfo",
    "__version__",
]

if TYPE_CHECKING:
    from ddpm_rt.bundle.bundle import Bundle
    from ddpm_rt.config import GenerateConfig
    from ddpm_rt.core.schedule import NoiseSchedule, ScheduleConfig
    from ddpm_rt.generator import Generator
    from ddpm_rt.progress import StepInfo


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
