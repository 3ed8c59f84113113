"""Reverse-process samplers over a :class:`~ddpm_rt.schedule.NoiseSchedule`.

A sampler is a small object with a documented contract (as in diffusers' schedulers):

* ``timesteps`` -- the integer timesteps the U-Net is evaluated at, highest first;
* ``step(x, eps, i, rng) -> x`` -- one update from ``x`` at ``timesteps[i]`` given the
  predicted noise ``eps``; any fresh noise is drawn from ``rng`` inside the step, as
  ``rng.standard_normal(x.shape, dtype=float32)``, and a step that adds no noise draws
  nothing.

Together with :func:`sample_loop`, which draws the initial noise first, this fixes the
order of random draws: initial noise for the whole batch, then each step's noise in step
order. One seed therefore gives the same image on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .errors import InputError
from .schedule import NoiseSchedule

SAMPLERS = ("ddpm", "ddim")


class DDPMSampler:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), exactly as the seed describes.

    Runs every timestep ``T, T-1, ..., 1``.
    """

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.timesteps = np.arange(schedule.timesteps, 0, -1, dtype=np.int64)

    def step(self, x: np.ndarray, eps: np.ndarray, i: int, rng: np.random.Generator) -> np.ndarray:
        s = self.schedule
        t = int(self.timesteps[i])
        alpha, alpha_bar, beta = s.alpha[t], s.alpha_bar[t], s.beta[t]
        # (1) Remove the predicted noise (Algorithm 2, line 4):
        #     mean = (x_t - eps * (1 - alpha_t) / sqrt(1 - alpha_bar_t)) / sqrt(alpha_t)
        mean = (x - eps * ((1.0 - alpha) / np.sqrt(1.0 - alpha_bar))) / np.sqrt(alpha)
        # (2) Add fresh noise sqrt(beta_t) * z, with z = 0 at the last step (t = 1).
        if t > 1:
            z = rng.standard_normal(x.shape, dtype=np.float32)
            return (mean + np.sqrt(beta) * z).astype(np.float32, copy=False)
        return mean.astype(np.float32, copy=False)


class DDIMSampler:
    """DDIM (Song et al. 2021, eq. 12) over any number of steps, with stochasticity ``eta``.

    ``eta = 0`` is deterministic after the initial noise; ``eta = 1`` with ``steps = T`` is
    ancestral DDPM sampling with the posterior variance. Timesteps are spaced evenly from
    ``T`` down ("trailing" spacing), so the first step always starts from pure noise.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int, eta: float = 0.0):
        T = schedule.timesteps
        if not 1 <= steps <= T:
            raise InputError(f"ddim steps must be between 1 and {T}, got {steps}")
        # eta > 1 asks for more noise than the posterior has: sqrt(1 - ab_prev - sigma^2)
        # would be imaginary. NaN fails this comparison too.
        if not 0.0 <= eta <= 1.0:
            raise InputError(f"eta must be between 0 and 1, got {eta}")
        self.schedule = schedule
        self.eta = float(eta)
        self.timesteps = np.round(np.linspace(T, 0, steps + 1))[:-1].astype(np.int64)

    def step(self, x: np.ndarray, eps: np.ndarray, i: int, rng: np.random.Generator) -> np.ndarray:
        s = self.schedule
        t = int(self.timesteps[i])
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        ab, ab_prev = np.float64(s.alpha_bar[t]), np.float64(s.alpha_bar[t_prev])
        # (1) Predicted clean image (eq. 12, first term): x0 = (x_t - sqrt(1-ab_t) eps) / sqrt(ab_t)
        x0 = (x - np.float32(np.sqrt(1.0 - ab)) * eps) / np.float32(np.sqrt(ab))
        # (2) sigma_t (eq. 16): eta * sqrt((1-ab_prev)/(1-ab_t)) * sqrt(1 - ab_t/ab_prev)
        sigma = self.eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab)) * np.sqrt(1.0 - ab / ab_prev)
        # (3) x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
        direction = np.float32(np.sqrt(max(1.0 - ab_prev - sigma**2, 0.0))) * eps
        x_prev = np.float32(np.sqrt(ab_prev)) * x0 + direction
        if sigma > 0:
            z = rng.standard_normal(x.shape, dtype=np.float32)
            x_prev = x_prev + np.float32(sigma) * z
        return x_prev.astype(np.float32, copy=False)


# DDIM's default stochasticity. Measured on the shipped emoji model (ddpm-rt eval, judge
# features, 428 images): DDIM-50 with eta = 0 doubled the Fréchet distance of DDPM-500
# (9.26 vs 4.54, recognition@1 0.81 vs 0.90); eta = 1 gave 4.06 and 0.94.
DEFAULT_DDIM_ETA = 1.0


def make_sampler(
    name: str, schedule: NoiseSchedule, steps: int | None = None, eta: float | None = None
) -> DDPMSampler | DDIMSampler:
    """Build a sampler by name. ``steps=None``: all T for ddpm, 50 for ddim;
    ``eta=None``: :data:`DEFAULT_DDIM_ETA` for ddim."""
    if name == "ddpm":
        if steps is not None and steps != schedule.timesteps:
            raise InputError(
                f"ddpm runs all {schedule.timesteps} steps; use --sampler ddim for {steps} steps"
            )
        if eta is not None:
            raise InputError("eta applies to ddim only")
        return DDPMSampler(schedule)
    if name == "ddim":
        steps = min(50, schedule.timesteps) if steps is None else steps
        return DDIMSampler(schedule, steps=steps, eta=DEFAULT_DDIM_ETA if eta is None else eta)
    raise InputError(f"unknown sampler {name!r} (choose from: {', '.join(SAMPLERS)})")


EpsFn = Callable[[np.ndarray, int], np.ndarray]


def sample_loop(
    eps_fn: EpsFn,
    sampler: DDPMSampler | DDIMSampler,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    progress: Callable[[Iterable], Iterable] | None = None,
    on_step: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Run the reverse process from Gaussian noise; returns x_0 in model space (about [-1, 1]).

    ``eps_fn(x, t)`` predicts the noise in ``x`` at integer timestep ``t``;
    ``on_step(i, t, eps, x)`` sees each step's predicted noise and its result (the runtime
    checks both for non-finite values there).
    """
    x = rng.standard_normal(shape, dtype=np.float32)  # (B, C, H, W), drawn first
    steps = range(len(sampler.timesteps))
    for i in progress(steps) if progress else steps:
        t = int(sampler.timesteps[i])
        eps = eps_fn(x, t)
        x = sampler.step(x, eps, i, rng)
        if on_step is not None:
            on_step(i, t, eps, x)
    return x


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Model space (B, C, H, W) in [-1, 1] -> images (B, H, W, C) uint8."""
    x = np.clip((x + 1.0) * 127.5, 0.0, 255.0)
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1)
