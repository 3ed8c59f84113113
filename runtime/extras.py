"""Optional dependencies (the package's extras): import one, or say which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from ddpm_rt.errors import InputError


def optional(module: str, extra: str) -> tuple[ModuleType | None, str | None]:
    """``(module, None)``, or ``(None, why)`` when a dependency outside this package is
    missing; ``why`` names the extra that installs it. A missing module of this package
    itself is a broken install, not a missing extra, and raises."""
    try:
        return importlib.import_module(module), None
    except ImportError as e:
        if (e.name or "").split(".")[0] == "ddpm_rt":
            raise
        return None, f"needs {e.name} (pip install 'ddpm-rt[{extra}]')"


def require(module: str, extra: str) -> ModuleType:
    """The module, or :class:`InputError` naming the extra that installs what it needs."""
    mod, why = optional(module, extra)
    if mod is None:
        raise InputError(f"this command {why}")
    return mod
