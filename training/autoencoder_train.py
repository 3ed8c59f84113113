"""``ddpm-rt train-autoencoder``: train the latent autoencoder on an emoji ``.npz``.

Loss per step: L1 + MSE between the image and its reconstruction, pixels in [-1, 1] (no
adversarial or perceptual term: no downloaded feature network exists here). One art style
(``holdout_style``, default twemoji, as the judge's) is kept out of training; the PSNR of
its reconstructions is logged at every checkpoint as the measure of generalisation.

Determinism as in :mod:`.train`: the batch order of epoch e comes from
``PCG64([seed, e])``, there is no other randomness, and a resumed run continues exactly as
the uninterrupted one. Checkpoints are atomic, weights first and config.json last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm_rt.core.samplers import to_uint8
from ddpm_rt.errors import CheckpointError, InputError
from ddpm_rt.images import save_png

from .autoencoder import (
    AE_FORMAT,
    AE_VERSION,
    AutoencoderConfig,
    build_autoencoder,
    check_decoder_cost,
    decode,
    encode,
    encode_images,
    encoder_sha256,
    latent_stats,
    psnr,
    read_autoencoder_config,
    to_pixels,
)
from .checkpoint import resume_settings
from .data import _load_array
from .loop import SingleModelLoop, batch_indices, pick_device

DEFAULT_STEPS = 5000


@dataclass(frozen=True)
class AETrainConfig:
    data: str
    out: str
    latent_channels: int = 4
    encoder_width: int = 32
    decoder_width: int = 48
    steps: int | None = None  # default DEFAULT_STEPS; on --resume, the stored total
    batch_size: int = 16
    lr: float = 1e-3  # decays linearly to 0 over the run
    mse_weight: float = 1.0  # loss = L1 + mse_weight * MSE
    holdout_style: str = "twemoji"  # "" = train on every style
    seed: int = 0
    checkpoint_every: int = 500
    device: str = "auto"
    # Fine-tune the decoder of this autoencoder with its encoder frozen: the latent space
    # (and the U-Net trained on it) stays valid, the decoder keeps learning.
    finetune_decoder: str | None = None

    @property
    def total_steps(self) -> int:
        return DEFAULT_STEPS if self.steps is None else self.steps

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if not self.mse_weight >= 0:
            raise InputError(f"mse-weight must be >= 0, got {self.mse_weight}")


def load_pixels(path: str | Path, holdout_style: str) -> tuple[np.ndarray, np.ndarray]:
    """(all images, held-out mask) from an emoji .npz (or any .npz with ``images``)."""
    arrays = _load_array(Path(path), "data")
    if not isinstance(arrays, dict) or "images" not in arrays:
        raise InputError(f"{path} must be an .npz with an 'images' array (ddpm-rt data emoji)")
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[1] != images.shape[2]:
        raise InputError(f"images must be square, got {images.shape[1]}x{images.shape[2]}")
    held = np.zeros(len(images), bool)
    if holdout_style:
        if "styles" not in arrays:
            raise InputError(f"{path} has no 'styles' array; pass --holdout-style ''")
        held = arrays["styles"] == holdout_style
        if not held.any():
            found = ", ".join(sorted(set(arrays["styles"].tolist())))
            raise InputError(f"no images of style {holdout_style!r} in {path} (found: {found})")
        if held.all():
            raise InputError(f"every image is of the held-out style {holdout_style!r}")
    return images, held


class AETrainer(SingleModelLoop):
    desc = kind = "autoencoder"
    read_config = staticmethod(read_autoencoder_config)

    def __init__(self, cfg: AETrainConfig, resume: bool = False):
        cfg.validate()
        self.cfg, self.out = cfg, Path(cfg.out)
        self.images, held = load_pixels(cfg.data, cfg.holdout_style)
        self.train_images, self.heldout = self.images[~held], self.images[held]
        self.ae_config = AutoencoderConfig(
            latent_channels=cfg.latent_channels,
            image_size=self.images.shape[1],
            encoder_width=cfg.encoder_width,
            decoder_width=cfg.decoder_width,
        )
        self.decoder_gflop = check_decoder_cost(self.ae_config)  # refused before any work
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)  # weight init
        self.model = build_autoencoder(self.ae_config).to(self.device)
        self.source = None  # the frozen encoder's checkpoint config, when fine-tuning
        if cfg.finetune_decoder:
            self._init_from(cfg.finetune_decoder)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=cfg.lr)
        self.pixels = to_pixels(self.train_images).to(self.device)  # (N, 3, H, W)
        self.step, self.total_steps, self.last_eval = 0, cfg.total_steps, {}
        if resume:
            self._load_state()

    def _init_from(self, src: str) -> None:
        from safetensors.torch import load_file

        meta = read_autoencoder_config(src)
        if "shift" not in meta["latent"] or "encoder_sha256" not in meta:
            raise InputError(
                f"{src} predates the latent shift and encoder identity records; retrain it "
                "(and re-run encode-latents) to fine-tune its decoder"
            )
        if AutoencoderConfig.from_dict(meta["autoencoder"]) != self.ae_config:
            raise InputError(
                f"--finetune-decoder {src} has another shape ({meta['autoencoder']}); give the "
                "same --latent-channels and widths"
            )
        try:
            self.model.load_state_dict(load_file(str(Path(src) / "model.safetensors")))
        except Exception as e:
            raise CheckpointError(f"cannot read the autoencoder in {src}: {e}") from None
        self.model.encoder.requires_grad_(False)
        self.source = meta

    def loss(self) -> torch.Tensor:
        idx = batch_indices(self.cfg.seed, self.step, len(self.pixels), self.cfg.batch_size)
        x = self.pixels[torch.from_numpy(idx).to(self.device)]
        if self.source is not None:  # the encoder is frozen
            with torch.no_grad():
                z = encode(self.model, x)
            y = decode(self.model, z)
        else:
            y = decode(self.model, encode(self.model, x))
        err = y - x
        return err.abs().mean() + self.cfg.mse_weight * err.pow(2).mean()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out-style PSNR and the latent scale factor over the whole data set."""
        self.model.eval()
        try:
            if self.source is not None:  # the frozen encoder's latent space, as recorded
                stats = {
                    k: self.source["latent"][k]
                    for k in ("scale_factor", "shift", "mean", "channel_std")
                }
                stats["std"] = 1.0 / stats["scale_factor"]
            else:
                stats = latent_stats(encode_images(self.model, self.images, device=self.device))
            return {
                "psnr_heldout": psnr(self.model, self.heldout, device=self.device)
                if len(self.heldout)
                else None,
                **stats,
            }
        finally:
            self.model.train()

    @torch.no_grad()
    def recon_grid(self, n: int = 8) -> Path:
        """``samples/recon_<step>.png``: n held-out images (top row) and their reconstructions."""
        shown = (self.heldout if len(self.heldout) else self.images)[:n]
        self.model.eval()
        try:
            y = decode(self.model, encode(self.model, to_pixels(shown).to(self.device)))
        finally:
            self.model.train()
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        return save_png(
            self.out / "samples" / f"recon_{self.step:07d}.png",
            np.concatenate([shown, to_uint8(y.clamp(-1, 1).cpu().numpy())]),
            scale=2,
            ncols=len(shown),
        )

    def summary(self) -> dict:
        return {"decoder_gflop": self.decoder_gflop, **self.last_eval, "out": str(self.out)}

    # -- checkpoints (SingleModelLoop.save writes them) ---------------------------------
    @property
    def shape(self) -> AutoencoderConfig:
        return self.ae_config

    def checkpoint_figures(self) -> dict:
        ev = self.evaluate()
        self.recon_grid()
        return ev

    def checkpoint_meta(self, ev: dict) -> dict:
        c = self.ae_config
        return {
            "format": AE_FORMAT,
            "version": AE_VERSION,
            "autoencoder": c.to_dict(),
            "latent": {
                "channels": c.latent_channels,
                "height": c.latent_size,
                "width": c.latent_size,
                "image_size": c.image_size,
                "scale_factor": ev["scale_factor"],
                "shift": ev["shift"],
                "mean": ev["mean"],
                "channel_std": ev["channel_std"],
            },
            "decoder_gflop": self.decoder_gflop,
            "psnr_heldout": ev["psnr_heldout"],
            "holdout_style": self.cfg.holdout_style,
            "encoder_sha256": encoder_sha256(self.model),
        }


def train_autoencoder(cfg: AETrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) into ``cfg.out``; returns a summary."""
    stored = resume_settings(cfg, resume, read_autoencoder_config)
    if stored is not None:
        cfg = AETrainConfig(**stored)
    return AETrainer(cfg, resume=resume).fit(progress=progress)


__all__ = ["AETrainConfig", "AETrainer", "train_autoencoder"]
