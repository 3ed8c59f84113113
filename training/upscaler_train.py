"""``ddpm-rt train-upscaler``: the cascade's super-resolution decoder on the 64x64 renders.

Each step: a batch of 64x64 renders, their 4x4 box averages (the 16x16 picture, exactly how
``ddpm-rt data emoji`` made the 16x16 data), **conditioning augmentation** of what the
network sees (Ho et al. 2021; Imagen): a Gaussian blur of random width on half the batch,
then Gaussian noise of a random level ``aug`` ~ U(0, max_aug) that the network is told;
the output is projected onto the clean 16x16 picture (:func:`.upscaler.project`). Loss: L1
+ MSE + ``edge_weight`` x L1 of the horizontal and vertical pixel differences (an edge
term: sharp outlines are what a plain pixel loss averages away, and it needs no downloaded
feature network).

One art style (``holdout_style``, twemoji by default, as the judge's) may be kept out; the
held-out PSNR at 64x64 against bicubic upscaling of the same 16x16 pictures is logged at
every checkpoint. Determinism: the batch order as :mod:`.train`, the augmentation from a
generator seeded by (seed, step); a resumed run continues bit for bit as the uninterrupted
one (a test compares the weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_rt.errors import InputError

from .autoencoder import to_pixels
from .autoencoder_train import load_pixels
from .checkpoint import resume_settings
from .loop import SingleModelLoop, batch_indices, pick_device
from .upscaler import (
    UPSCALER_FORMAT,
    UPSCALER_VERSION,
    Upscaler,
    UpscalerConfig,
    box_down,
    check_upscaler_cost,
    read_upscaler_config,
)

DEFAULT_STEPS = 3000


@dataclass(frozen=True)
class UpscalerTrainConfig:
    data: str
    out: str
    width: int = 48
    blocks: tuple[int, ...] = (3, 3, 1)
    steps: int | None = None  # default DEFAULT_STEPS; on --resume, the stored total
    batch_size: int = 16
    lr: float = 1e-3  # decays linearly to 0 over the run
    edge_weight: float = 1.0
    max_aug: float = 0.3  # noise level drawn from U(0, max_aug), pixels in [-1, 1]
    max_blur: float = 1.0  # blur sigma (16x16 pixels) drawn from U(0, max_blur), half the batch
    holdout_style: str = "twemoji"  # "" = train on every style
    seed: int = 0
    checkpoint_every: int = 500
    device: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))

    @property
    def total_steps(self) -> int:
        return DEFAULT_STEPS if self.steps is None else self.steps

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        UpscalerConfig(width=self.width, blocks=self.blocks)  # the shape's own checks
        for name in ("edge_weight", "max_aug", "max_blur"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 <= v <= 10):
                raise InputError(f"{name.replace('_', '-')} must be in [0, 10], got {v}")


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image of (B, C, H, W) blurred by a 5x5 Gaussian of its own sigma (0: unchanged)."""
    r = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    s = sigma.clamp_min(1e-3).reshape(-1, 1)
    k1 = torch.exp(-(r**2) / (2 * s**2))
    k1 = k1 / k1.sum(1, keepdim=True)  # (B, 5)
    k2 = k1[:, :, None] * k1[:, None, :]  # (B, 5, 5)
    b, c, h, w = x.shape
    weight = k2.repeat_interleave(c, 0)[:, None]  # (B*C, 1, 5, 5)
    y = F.conv2d(
        F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate"), weight, groups=b * c
    )
    return y.reshape(b, c, h, w)


def augment(low: torch.Tensor, cfg: UpscalerTrainConfig, gen: torch.Generator):
    """(what the network sees, its aug level) for a batch of clean 16x16 pictures."""
    b = low.shape[0]
    u = torch.rand(3, b, generator=gen)
    sigma = torch.where(u[0] < 0.5, u[1] * cfg.max_blur, torch.zeros(b))
    aug = u[2] * cfg.max_aug
    noise = torch.randn(low.shape, generator=gen)
    seen = blur(low, sigma.to(low.device)) + aug.to(low.device).reshape(-1, 1, 1, 1) * noise.to(
        low.device
    )
    return seen, aug.to(low.device)


def loss_of(y: torch.Tensor, x: torch.Tensor, edge_weight: float) -> torch.Tensor:
    err = y - x
    loss = err.abs().mean() + err.pow(2).mean()
    if edge_weight:
        dx = (y[..., :, 1:] - y[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
        dy = (y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
        loss = loss + edge_weight * (dx.abs().mean() + dy.abs().mean())
    return loss


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b).pow(2).mean().item()
    return 10 * math.log10(4.0 / mse) if mse > 0 else math.inf


def bicubic(low: torch.Tensor, f: int) -> torch.Tensor:
    """Pillow's bicubic upscaling (the baseline of the detail measure), as a tensor."""
    from ddpm_rt.core.samplers import to_uint8

    from .detail import resize

    u8 = to_uint8(low.clamp(-1, 1).cpu().numpy())
    return to_pixels(resize(u8, u8.shape[1] * f, "bicubic"))


class UpscalerTrainer(SingleModelLoop):
    desc = kind = "upscaler"
    read_config = staticmethod(read_upscaler_config)

    def __init__(self, cfg: UpscalerTrainConfig, resume: bool = False):
        cfg.validate()
        self.cfg, self.out = cfg, Path(cfg.out)
        images, held = load_pixels(cfg.data, cfg.holdout_style)
        factor = 2 ** (len(cfg.blocks) - 1)
        size = images.shape[1]
        if size % (4 * factor):
            raise InputError(
                f"{cfg.data} holds {size}x{size} images: the upscaler's {factor}x needs a "
                f"multiple of {4 * factor} (ddpm-rt data emoji --size 64)"
            )
        self.config = UpscalerConfig(width=cfg.width, blocks=cfg.blocks, low_size=size // factor)
        self.gflop = check_upscaler_cost(self.config)  # refused before any work
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)  # weight init
        self.model = Upscaler(self.config).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.pixels = to_pixels(images[~held]).to(self.device)
        self.heldout = to_pixels(images[held])
        self.step, self.total_steps, self.last_eval = 0, cfg.total_steps, {}
        if resume:
            self._load_state()

    def loss(self) -> torch.Tensor:
        f = self.config.factor
        idx = batch_indices(self.cfg.seed, self.step, len(self.pixels), self.cfg.batch_size)
        x = self.pixels[torch.from_numpy(idx).to(self.device)]
        low = box_down(x, f)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        seen, aug = augment(low, self.cfg, gen)
        y = self.model(low, aug, cond=seen)
        return loss_of(y, x, self.cfg.edge_weight)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out PSNR at 64x64: the network (aug level 0) and bicubic upscaling."""
        if not len(self.heldout):
            return {"psnr_heldout": None, "psnr_bicubic": None}
        self.model.eval()
        try:
            x = self.heldout
            low = box_down(x, self.config.factor)
            ys = [
                self.model(lo.to(self.device), torch.zeros(len(lo), device=self.device)).cpu()
                for lo in low.split(64)
            ]
            return {
                "psnr_heldout": psnr_db(torch.cat(ys), x),
                "psnr_bicubic": psnr_db(bicubic(low, self.config.factor), x),
            }
        finally:
            self.model.train()

    def summary(self) -> dict:
        return {"gflop": self.gflop, **self.last_eval, "out": str(self.out)}

    @property
    def shape(self) -> UpscalerConfig:
        return self.config

    def checkpoint_meta(self, ev: dict) -> dict:
        return {
            "format": UPSCALER_FORMAT,
            "version": UPSCALER_VERSION,
            "upscaler": self.config.to_dict(),
            "gflop": self.gflop,
            **ev,
            "holdout_style": self.cfg.holdout_style,
        }


def train_upscaler(cfg: UpscalerTrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) into ``cfg.out``; returns a summary."""
    stored = resume_settings(cfg, resume, read_upscaler_config)
    if stored is not None:
        cfg = UpscalerTrainConfig(**stored)
    return UpscalerTrainer(cfg, resume=resume).fit(progress=progress)


__all__ = ["UpscalerTrainConfig", "UpscalerTrainer", "augment", "blur", "train_upscaler"]
