"""The DDPM noise schedule: the one source of truth for training and sampling.

Tables are indexed by the integer timestep ``t`` in ``0..T``. Index 0 is the clean image
(``alpha_bar[0] == 1``, ``beta[0] == 0``); steps ``1..T`` use linear betas from
``beta_start`` to ``beta_end`` (Ho et al. 2020, sec. 4). Math is done in float64 and the
tables are stored as float32, which is what both torch and the runtime consume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ddpm_rt.errors import InputError


def timestep_input(t, timesteps: int):
    """The U-Net's time input for integer timestep ``t``: ``t / T`` (the course's convention).

    The one place it is written: training (torch tensors) and sampling (NumPy) both call it.
    """
    return t / timesteps


def predict_x0(x: np.ndarray, eps: np.ndarray, x_coef, eps_coef) -> np.ndarray:
    """The clean-image estimate x̂0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) (Ho et al. 2020,
    eq. 15; DDIM's "predicted x0", Song et al. 2021, eq. 12), in the precomputed form
    ``x_coef * x - eps_coef * eps`` with the coefficients of
    :meth:`NoiseSchedule.x0_coefficients`. The one place it is written: the samplers and the
    step previews call it."""
    return x_coef * x - eps_coef * eps


@dataclass(frozen=True)
class ScheduleConfig:
    timesteps: int = 500
    beta_start: float = 1e-4
    beta_end: float = 0.02
    kind: str = "linear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScheduleConfig:
        return cls(**{k: d[k] for k in ("timesteps", "beta_start", "beta_end", "kind") if k in d})


class NoiseSchedule:
    """Float32 tables ``beta``, ``alpha``, ``alpha_bar`` of length ``T + 1``."""

    def __init__(self, config: ScheduleConfig | None = None):
        config = config or ScheduleConfig()
        if config.kind != "linear":
            raise InputError(f"unknown noise schedule kind {config.kind!r} (supported: linear)")
        if config.timesteps < 1:
            raise InputError(f"timesteps must be >= 1, got {config.timesteps}")
        if not 0.0 < config.beta_start <= config.beta_end < 1.0:
            raise InputError(
                f"need 0 < beta_start <= beta_end < 1, got {config.beta_start}, {config.beta_end}"
            )
        self.config = config
        T = config.timesteps
        beta = np.zeros(T + 1, dtype=np.float64)
        beta[1:] = np.linspace(config.beta_start, config.beta_end, T, dtype=np.float64)
        alpha = 1.0 - beta
        alpha_bar = np.cumprod(alpha)  # alpha[0] == 1, so alpha_bar[0] == 1
        # float64 tables for samplers' per-run coefficients (computed in float64, then
        # stored float32 once per run, so no per-step scalar promotion rules apply)
        self.beta64, self.alpha64, self.alpha_bar64 = beta, alpha, alpha_bar
        self.beta = beta.astype(np.float32)
        self.alpha = alpha.astype(np.float32)
        self.alpha_bar = alpha_bar.astype(np.float32)

    @property
    def timesteps(self) -> int:
        return self.config.timesteps

    def x0_coefficients(self, t) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(1 / sqrt(ab_t), sqrt(1 - ab_t) / sqrt(ab_t))`` at timesteps ``t``, computed
        in float64: the coefficients of :func:`predict_x0`."""
        ab = self.alpha_bar64[np.asarray(t)]
        return (1.0 / np.sqrt(ab)).astype(np.float32), (np.sqrt(1.0 - ab) / np.sqrt(ab)).astype(
            np.float32
        )

    def add_noise(self, x0: np.ndarray, eps: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Forward process q(x_t | x_0): sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps."""
        ab = self.alpha_bar[np.asarray(t)].reshape(-1, *([1] * (x0.ndim - 1)))
        return np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * eps
