"""Generation settings and the checks every entry point applies before any work."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np

from ddpm_rt.bundle.manifest import MAX_TIMESTEPS
from ddpm_rt.core.samplers import SAMPLERS, SPACINGS, Sampler, make_sampler, resolve_settings
from ddpm_rt.core.schedule import NoiseSchedule
from ddpm_rt.errors import InputError

MAX_NUM = 100_000  # images per call; memory is checked separately, against this machine
MAX_BATCH_SIZE = 4096
MAX_GUIDANCE = 50.0  # beyond this guided noise leaves the model's range (and is useless)
MAX_SEED = 2**63 - 1


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


def check_int(name: str, v, lo: int, hi: int) -> int:
    if not _is_int(v):
        raise InputError(f"{name} must be an integer, got {type(v).__name__} {v!r:.40}")
    if not lo <= v <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {v}")
    return int(v)


def check_real(name: str, v, lo: float, hi: float) -> float:
    if not _is_real(v):
        raise InputError(f"{name} must be a number, got {type(v).__name__} {v!r:.40}")
    if not (math.isfinite(v) and lo <= v <= hi):  # NaN and Inf fail here
        raise InputError(f"{name} must be a finite number between {lo:g} and {hi:g}, got {v}")
    return float(v)


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings; CLI flags map one to one onto these fields."""

    num: int = 1  # images per prompt
    # Defaults chosen by the rule in ddpm_rt.training.evaluate.choose_default (the cheapest
    # setting within one standard error of the best on held-out recognition@5, Fréchet within
    # 1.1x of DDPM-500), applied to the shipped model's evaluation grid: DDIM, 8 steps, eta 1,
    # guidance 2 (models/default/MODEL_CARD.md).
    sampler: str = "ddim"
    steps: int | None = None  # None: the sampler's default (samplers.DEFAULT_STEPS; ddpm: T)
    eta: float | None = None  # ddim only, in [0, 1]; None: DEFAULT_DDIM_ETA (1.0)
    seed: int = 0
    guidance: float = 2.0  # classifier-free guidance scale in [0, 50]; 1 = plain conditional
    batch_size: int = 16
    spacing: str | None = None  # few-step samplers: "time" (default) or "logsnr"

    def validate(self) -> None:
        """Types and ranges of every field; raises :class:`InputError` naming the field."""
        check_int("num", self.num, 1, MAX_NUM)
        check_int("batch size", self.batch_size, 1, MAX_BATCH_SIZE)
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise InputError(
                f"unknown sampler {self.sampler!r:.40} (choose from: {', '.join(SAMPLERS)})"
            )
        if self.steps is not None:
            check_int("steps", self.steps, 1, MAX_TIMESTEPS)
        if self.eta is not None:
            check_real("eta", self.eta, 0.0, 1.0)
        check_real("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        check_int("seed", self.seed, 0, MAX_SEED)
        if self.spacing is not None and (
            not isinstance(self.spacing, str) or self.spacing not in SPACINGS
        ):
            raise InputError(
                f"unknown spacing {self.spacing!r:.40} (choose from: {', '.join(SPACINGS)})"
            )

    def make_sampler(self, schedule: NoiseSchedule) -> Sampler:
        """The sampler these settings ask for (the one place one is made from settings)."""
        return make_sampler(self.sampler, schedule, self.steps, self.eta, self.spacing)

    def resolved(self, schedule: NoiseSchedule) -> GenerateConfig:
        """These settings with the sampler's defaults filled in (steps, eta, spacing), as
        a run uses them and provenance records them."""
        steps, eta, spacing = resolve_settings(
            self.sampler, schedule, self.steps, self.eta, self.spacing
        )
        return replace(self, steps=steps, eta=eta, spacing=spacing)


def memory_limit() -> int:
    """Bytes one generation may plan to use: half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small device
        return 2 * 2**30


def estimate_bytes(cfg: GenerateConfig, image_shape: tuple[int, int, int], prompts: int = 1) -> int:
    """What a call will allocate, roughly: the uint8 results plus, for the rows of one U-Net
    call, x_t, eps, noise and their copies, and the U-Net's activations (about 64 image-sized
    float32 tensors per row at this project's widths)."""
    c, h, w = image_shape
    total = cfg.num * prompts
    rows = min(cfg.batch_size, total) * (1 if cfg.guidance == 1.0 else 2)
    return total * h * w * c + rows * c * h * w * 4 * (8 + 64)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(what: str, need: int) -> None:
    limit = memory_limit()
    if need > limit:
        raise InputError(
            f"{what} needs about {_size(need)}, over the limit of {_size(limit)} "
            "(half of this machine's memory)"
        )
