"""``ddpm-rt train``: DDPM training of the conditional U-Net (Ho et al. 2020, Algorithm 1).

Per step: a batch of images x0 and contexts c; a random timestep t ~ U{1..T} per image;
noise eps ~ N(0, I); x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps; loss =
MSE(eps, model(x_t, t/T, c)). Contexts are replaced by the null (zero) context with
probability ``context_dropout`` so that classifier-free guidance works at sampling time.

Determinism: the batch order of epoch e comes from ``PCG64([seed, e])`` and every step's
timesteps/noise/dropout from a torch generator seeded with ``(seed, step)``, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddpm_rt.core.samplers import make_sampler, sample_loop, to_uint8
from ddpm_rt.core.schedule import NoiseSchedule, ScheduleConfig, timestep_input
from ddpm_rt.errors import InputError
from ddpm_rt.images import save_png

from .checkpoint import load_checkpoint, resume_settings, save_checkpoint
from .data import Dataset, load_dataset
from .loop import TrainLoop, batch_indices, ema_update, pick_device
from .model import (
    ContextUnet,
    UNetConfig,
    read_checkpoint_config,
)


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    labels: str | None = None
    contexts: str | None = None
    label_names: list[str] | None = field(default=None)
    captions: str | None = None  # .txt/.json, a caption (or a list) per image
    text_encoder: str | None = None  # folder from `ddpm-rt text export`
    image_size: int | None = None  # resize imagefolder images to this square size
    steps: int | None = None  # total optimiser steps; default: 32 epochs
    epochs: float | None = None
    batch_size: int = 100
    lr: float = 1e-3  # decays linearly to 0 over the run
    ema_decay: float = 0.999
    context_dropout: float = 0.1
    seed: int = 0
    sample_every: int = 10  # epochs between sample grids; 0 = only at the end
    checkpoint_every: int = 500  # steps
    n_feat: int = 64
    context_gate: str = "linear"  # "tanh": bounded multiplier 1 + tanh(c_emb)
    blocks: int = 2  # residual blocks per U-Net level
    attention: bool = False  # self-attention at the lowest resolution
    null_context: str = "zero"  # "learned": a trained vector stands in for the zero context
    norm: str = "group"  # residual blocks: "group", "batch" or "ws" (weight standardised)
    activation: str = "gelu"  # residual blocks: "gelu" or "relu"
    timesteps: int = 500
    beta_start: float = 1e-4
    beta_end: float = 0.02
    device: str = "auto"

    def validate(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise InputError("give --steps or --epochs, not both")
        for name in ("batch_size", "checkpoint_every", "n_feat", "timesteps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1")
        if (self.steps is not None and self.steps < 1) or (
            self.epochs is not None and self.epochs <= 0
        ):
            raise InputError("steps/epochs must be positive")
        if not 0 <= self.context_dropout < 1:
            raise InputError(f"context-dropout must be in [0, 1), got {self.context_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise InputError(f"lr must be > 0, got {self.lr}")


def _dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain run."""
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Trainer(TrainLoop):
    """One training run. Under ``torchrun`` (WORLD_SIZE > 1) it trains with
    DistributedDataParallel: every rank draws the same global batch and noise from the
    (seed, step) generators and takes its shard ``[rank::world]``, so the averaged gradient
    is the single-process gradient; rank 0 alone logs, samples and checkpoints."""

    zero_rate_when_idle = True

    def __init__(self, cfg: TrainConfig, data: Dataset, resume: bool = False):
        cfg.validate()
        self.cfg, self.data = cfg, data
        self.out = Path(cfg.out)
        self.rank, self.world = _dist_env()
        if self.world > 1 and cfg.batch_size % self.world:
            raise InputError(f"batch size {cfg.batch_size} must divide by {self.world} processes")
        self.device = pick_device(cfg.device)
        if self.world > 1 and self.device.type == "cuda":
            import os

            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        h, w = data.image_size
        self.unet_config = UNetConfig(
            n_feat=cfg.n_feat,
            context_dim=data.context_dim,
            in_channels=data.channels,
            height=h,
            width=w,
            context_gate=cfg.context_gate,
            blocks=cfg.blocks,
            attention=cfg.attention,
            null_context=cfg.null_context,
            norm=cfg.norm,
            activation=cfg.activation,
        )
        self.schedule = NoiseSchedule(ScheduleConfig(cfg.timesteps, cfg.beta_start, cfg.beta_end))
        self.alpha_bar = torch.from_numpy(self.schedule.alpha_bar).to(self.device)
        torch.manual_seed(cfg.seed)  # weight init
        self.model = ContextUnet(self.unet_config).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.net = self.model  # what the training step calls: the DDP wrapper when distributed
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.steps_per_epoch = max(1, len(data) // cfg.batch_size)
        if cfg.steps is not None:
            self.total_steps = cfg.steps
        else:
            self.total_steps = max(1, round((cfg.epochs or 32) * self.steps_per_epoch))
        self.step = 0
        # (N, H, W, 3) uint8 pixels, or (N, C, h, w) float32 scaled latents
        self.images = torch.from_numpy(data.images).to(self.device)
        self.decoder = None  # latent data: the autoencoder that draws the sample grids
        self.table = torch.from_numpy(data.table).to(self.device)  # (U, D)
        self.choices = torch.from_numpy(data.choices).to(self.device)  # (N, K)
        self.num_choices = torch.from_numpy(data.num_choices).to(self.device)  # (N,)
        if resume:
            self._load_state()

    # -- one step (TrainLoop.train_step sets the lr and steps the optimiser) -------------
    def _batch_indices(self, step: int) -> np.ndarray:
        return batch_indices(self.cfg.seed, step, len(self.data), self.cfg.batch_size)

    def loss(self) -> torch.Tensor:
        cfg = self.cfg
        idx = torch.from_numpy(self._batch_indices(self.step)).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + self.step)
        if self.data.latent is not None:
            x0 = self.images[idx]  # (B, C, h, w), unit variance
        else:
            x0 = self.images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        b = x0.shape[0]
        # One of each image's captions (or its one label/context), at random.
        pick = (torch.rand(b, generator=gen, device=self.device) * self.num_choices[idx]).long()
        c = self.table[self.choices[idx, pick]]  # (B, D)
        keep = torch.rand(b, 1, generator=gen, device=self.device) >= cfg.context_dropout
        c = c * keep  # dropped rows become the null (zero) context
        t = torch.randint(1, cfg.timesteps + 1, (b,), generator=gen, device=self.device)
        eps = torch.randn(x0.shape, generator=gen, device=self.device)
        if self.world > 1:  # this rank's shard of the global batch
            x0, c, t, eps = (v[self.rank :: self.world] for v in (x0, c, t, eps))
            b = x0.shape[0]
        ab = self.alpha_bar[t].view(b, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        pred = self.net(x_t, timestep_input(t.float(), cfg.timesteps).view(b, 1), c)
        return torch.nn.functional.mse_loss(pred, eps)

    def after_update(self) -> None:
        # EMA with warm-up: early on, follow the raw weights closely.
        ema_update(
            self.ema, self.model, min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        )

    # -- the loop's hooks (TrainLoop.fit runs the loop) -----------------------------------
    def begin(self) -> None:
        (self.out / "samples").mkdir(exist_ok=True)

    def log_fields(self) -> dict:
        return {"epoch": self.step / self.steps_per_epoch}

    def periodic(self, log) -> None:
        # A checkpoint every checkpoint_every steps, the last step's too (and finish's).
        if self.step % self.cfg.checkpoint_every == 0:
            self.save()
        sample_steps = self.cfg.sample_every * self.steps_per_epoch
        if sample_steps and self.step % sample_steps == 0:
            self.sample_grid()

    def finish(self, log) -> None:
        self.in_sync = self._ranks_in_sync() if self.world > 1 else None
        if self.rank == 0:
            self.save()
            self.sample_grid()

    def summary(self) -> dict:
        extra = {"world_size": self.world}
        if self.world > 1:
            extra["ranks_in_sync"] = self.in_sync
        return extra

    def _ranks_in_sync(self) -> bool:
        """All ranks hold bit-identical raw and EMA weights (checked by gathering checksums)."""
        import torch.distributed as dist

        with torch.no_grad():
            flat = torch.cat(
                [
                    p.detach().double().flatten()
                    for p in (*self.model.parameters(), *self.ema.parameters())
                ]
            )
            sums = torch.stack(
                [
                    flat.sum(),
                    (flat * torch.arange(len(flat), dtype=flat.dtype, device=flat.device)).sum(),
                ]
            )
        gathered = [torch.zeros_like(sums) for _ in range(self.world)]
        dist.all_gather(gathered, sums)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    # -- samples and checkpoints --------------------------------------------------------
    def sample_grid(self, per_context: int = 4, rows: int = 8) -> Path | None:
        """A grid from the EMA weights: one row per label (or per data context), DDIM-25;
        latents are decoded by the data's autoencoder (no grid when it is not at hand)."""
        if self.data.latent is not None and self.decoder is None:
            from .autoencoder import sample_grid_decoder

            self.decoder = sample_grid_decoder(self.data.latent, self.device)
            if self.decoder is None:
                return None
        ctx, _ = self.data.sample_contexts(rows)
        ctx = np.repeat(ctx, per_context, axis=0)
        c = torch.from_numpy(ctx).to(self.device)
        T = self.cfg.timesteps

        @torch.no_grad()
        def eps_fn(x: np.ndarray, t: int) -> np.ndarray:
            xt = torch.from_numpy(x).to(self.device)
            tt = torch.full((len(x), 1), timestep_input(t, T), device=self.device)
            return self.ema(xt, tt, c).cpu().numpy()

        sampler = make_sampler("ddim", self.schedule, steps=min(25, T))
        x = sample_loop(
            eps_fn,
            sampler,
            (len(ctx), self.data.channels, *self.data.image_size),
            np.random.Generator(np.random.PCG64(0)),
        )
        if self.decoder is not None:
            x = self.decoder(x)
        return save_png(
            self.out / "samples" / f"step_{self.step:07d}.png",
            to_uint8(x),
            scale=2,
            ncols=per_context,
        )

    def save(self, log=None) -> None:
        save_checkpoint(self)

    def _load_state(self) -> None:
        load_checkpoint(self)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Load data, train (or resume), checkpoint into ``cfg.out``; returns a summary."""
    out = Path(cfg.out)
    # Training settings come from the checkpoint; --steps may extend the run.
    stored = resume_settings(cfg, resume, read_checkpoint_config)
    if stored is not None:
        if cfg.steps is not None:
            stored["epochs"] = None
        cfg = TrainConfig(**stored)
    rank, world = _dist_env()
    if world > 1:
        import torch.distributed as dist

        use_nccl = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group("nccl" if use_nccl else "gloo")
    try:
        # Rank 0 embeds captions (and fills the cache) first; the others then read the cache.
        load = lambda: load_dataset(  # noqa: E731
            cfg.data,
            cfg.labels,
            cfg.contexts,
            cfg.label_names,
            cfg.captions,
            cfg.text_encoder,
            cfg.image_size,
            cache=out / "caption_embeddings.npz",
        )
        data = load() if rank == 0 else None
        if world > 1:
            dist.barrier()
        data = data or load()
        trainer = Trainer(cfg, data, resume=resume)
        summary = trainer.fit(progress=progress)
        if world > 1:
            dist.barrier()  # rank 0's final checkpoint is on disk before anyone returns
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    summary["out"] = str(out)
    return summary


__all__ = ["TrainConfig", "Trainer", "train"]
