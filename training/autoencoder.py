"""The latent autoencoder: 64x64x3 pixels <-> 16x16xC latents (issue 19).

The network is diffusers' ``AutoencoderTiny`` (the TAESD architecture: plain 3x3 conv
blocks, ReLU, nearest upsampling -- ops every backend runs) in a small configuration: one
width per side, ``len(blocks) - 1`` stride-2 levels (two: a 4x smaller latent). It is
deterministic (not variational); the decoder soft-clamps its input to +-3
(``3 tanh(z / 3)``), which keeps the latent range bounded without a KL term.

The diffusion model sees ``(latent - shift) * scale_factor``, where ``shift`` is the
per-channel mean and ``scale_factor`` = 1 / std of the shifted latents over the whole data
set (Rombach et al. 2022, sec. 4.3.2; Stable Diffusion 3's shift factor), recorded in the
checkpoint's ``config.json`` and in every latent data file.

Checkpoint folder (written by :mod:`.autoencoder_train`):

    model.safetensors         the weights
    train_state.safetensors   optimiser state (for --resume)
    config.json               {"format": "ddpm-rt-autoencoder", "autoencoder": {...},
                               "latent": {channels, height, width, scale_factor, ...},
                               "train": {...}, "step", "psnr_heldout", ...}
    metrics.jsonl             {"step", "loss"} every 10 steps, plus PSNR at checkpoints
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm_rt.errors import CheckpointError, InputError, first_line

AE_FORMAT = "ddpm-rt-autoencoder"
AE_VERSION = 1
# The decoder runs once per image at the end of sampling (and for previews): issue 19 caps
# it at about 8 U-Net image-steps.
MAX_DECODER_GFLOP = 2.5  # per 64x64 image


@dataclass(frozen=True)
class AutoencoderConfig:
    latent_channels: int = 4
    image_size: int = 64
    encoder_width: int = 32
    encoder_blocks: tuple[int, ...] = (1, 2, 2)  # TAESD blocks per level; level i>0 halves
    decoder_width: int = 48
    decoder_blocks: tuple[int, ...] = (3, 3, 1)  # level i < last doubles

    def __post_init__(self):
        object.__setattr__(self, "encoder_blocks", tuple(self.encoder_blocks))
        object.__setattr__(self, "decoder_blocks", tuple(self.decoder_blocks))
        if not 1 <= self.latent_channels <= 64:
            raise InputError(f"latent channels must be in [1, 64], got {self.latent_channels}")
        if len(self.encoder_blocks) != len(self.decoder_blocks) or len(self.encoder_blocks) < 2:
            raise InputError("encoder and decoder need the same number of levels (>= 2)")
        if any(b < 0 or b > 8 for b in (*self.encoder_blocks, *self.decoder_blocks)):
            raise InputError("blocks per level must be in [0, 8]")
        for name in ("encoder_width", "decoder_width"):
            if not 4 <= getattr(self, name) <= 512:
                raise InputError(f"{name.replace('_', '-')} must be in [4, 512]")
        if self.image_size < 8 or self.image_size % self.downscale:
            raise InputError(
                f"image size {self.image_size} must be >= 8 and divisible by {self.downscale}"
            )

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.encoder_blocks) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downscale

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def build_autoencoder(cfg: AutoencoderConfig) -> torch.nn.Module:
    """A randomly initialised ``AutoencoderTiny`` of this shape (nothing is downloaded)."""
    from diffusers import AutoencoderTiny

    n = len(cfg.encoder_blocks)
    return AutoencoderTiny(
        encoder_block_out_channels=(cfg.encoder_width,) * n,
        decoder_block_out_channels=(cfg.decoder_width,) * n,
        num_encoder_blocks=cfg.encoder_blocks,
        num_decoder_blocks=cfg.decoder_blocks,
        latent_channels=cfg.latent_channels,
    )


def encode(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) unscaled latents."""
    return model.encode(x).latents


def decode(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) unscaled latents -> (B, 3, H, W), about [-1, 1] (not clamped)."""
    return model.decode(z).sample


def decoder_gflop(cfg: AutoencoderConfig) -> float:
    """Decoder FLOPs per image at ``cfg.image_size`` (a multiply-add counts 2), counted by
    torch's FlopCounterMode on one forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_autoencoder(cfg).eval()
    z = torch.zeros(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        decode(model, z)
    return counter.get_total_flops() / 1e9


def check_decoder_cost(cfg: AutoencoderConfig) -> float:
    """The decoder's GFLOP per image; refuses one over the cap (scaled to 64x64)."""
    gflop = decoder_gflop(cfg)
    per_64 = gflop * (64 * 64) / cfg.image_size**2
    if per_64 > MAX_DECODER_GFLOP:
        raise InputError(
            f"decoder costs {per_64:.2f} GFLOP per 64x64 image (limit {MAX_DECODER_GFLOP}); "
            "use a smaller --decoder-width or fewer decoder blocks"
        )
    return gflop


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_images(model, images: np.ndarray, batch: int = 64, device="cpu") -> np.ndarray:
    """uint8 (N, H, W, 3) -> unscaled latents float32 (N, C, h, w), in batches."""
    out = [
        encode(model, to_pixels(images[i : i + batch]).to(device)).cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def psnr(model, images: np.ndarray, batch: int = 64, device="cpu") -> float:
    """Mean per-image PSNR (dB, pixels in [0, 1]) of reconstructions clamped to [-1, 1]."""
    values = []
    for i in range(0, len(images), batch):
        x = to_pixels(images[i : i + batch]).to(device)
        y = decode(model, encode(model, x)).clamp(-1, 1)
        mse = ((y - x) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        values.append((-10 * mse.log10()).cpu())
    return float(torch.cat(values).mean())


def latent_stats(latents: np.ndarray) -> dict:
    """How the diffusion model's latents are made from the encoder's: ``(z - shift) *
    scale_factor``, with ``shift`` the per-channel mean and ``scale_factor`` one number, 1 /
    std of the shifted latents (Stable Diffusion 3's shift and scale, the shift per channel:
    this encoder's channel means differ by up to 1.7 std, which a zero-mean diffusion model
    would otherwise have to learn as an offset). Per-channel std is kept for information."""
    z = latents.astype(np.float64)  # (N, C, h, w)
    shift = z.mean(axis=(0, 2, 3))
    std = float((z - shift[None, :, None, None]).std())
    if not np.isfinite(std) or std <= 0:
        raise InputError(f"latents have std {std}; the autoencoder is broken")
    return {
        "scale_factor": 1.0 / std,
        "shift": shift.tolist(),
        "mean": float(z.mean()),
        "std": std,
        "channel_std": z.std(axis=(0, 2, 3)).tolist(),
    }


def to_model_latents(raw: np.ndarray, info: dict) -> np.ndarray:
    """Encoder latents -> the diffusion model's: (z - shift) * scale_factor (float32)."""
    shift = np.asarray(info.get("shift", 0.0), np.float64).reshape(1, -1, 1, 1)
    return ((raw - shift) * float(info["scale_factor"])).astype(np.float32)


def from_model_latents(x: torch.Tensor, info: dict) -> torch.Tensor:
    """The diffusion model's latents -> the decoder's input: x / scale_factor + shift."""
    shift = torch.as_tensor(info.get("shift", 0.0), dtype=x.dtype, device=x.device)
    return x / float(info["scale_factor"]) + shift.reshape(1, -1, 1, 1)


def encoder_sha256(model: torch.nn.Module) -> str:
    """The identity of the latent space: sha256 over the encoder's tensors (names, dtypes,
    shapes, bytes, in name order). A decoder fine-tuned on a frozen encoder keeps it, so a
    U-Net trained on that encoder's latents can be exported with the newer decoder."""
    import hashlib

    h = hashlib.sha256()
    state = model.encoder.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def read_autoencoder_config(ckpt_dir: str | Path) -> dict:
    from .model import read_checkpoint_config

    return read_checkpoint_config(ckpt_dir, AE_FORMAT, AE_VERSION, "autoencoder checkpoint")


def load_autoencoder(ckpt_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """The trained autoencoder (eval mode) and its config.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_autoencoder_config(ckpt_dir)
    model = build_autoencoder(AutoencoderConfig.from_dict(meta["autoencoder"]))
    path = Path(ckpt_dir) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"autoencoder weights missing: {path}")
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot load {path}: {first_line(e)}") from None
    return model.eval(), meta


def sample_grid_decoder(info: dict, device="cpu"):
    """The decoder of the U-Net trainer's sample grids. For latent data's ``latent`` record:
    a function scaled latents (N, C, h, w) -> pixels (N, 3, H, W) in [-1, 1] (NumPy), or
    None (with a note on stderr) when the autoencoder that made them is not at its recorded
    path or has other weights."""
    import hashlib
    import sys

    ae = info.get("autoencoder", {})
    weights = Path(ae.get("path", "")) / "model.safetensors"
    if not weights.is_file():
        print(f"note: autoencoder {ae.get('path')} not found; no sample grids", file=sys.stderr)
        return None
    if hashlib.sha256(weights.read_bytes()).hexdigest() != ae.get("sha256"):
        print(f"note: autoencoder in {ae['path']} has changed; no sample grids", file=sys.stderr)
        return None
    model = load_autoencoder(ae["path"])[0].to(device)

    @torch.no_grad()
    def to_pixels_np(latents: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(latents, np.float32)).to(device)
        return decode(model, from_model_latents(x, info)).clamp(-1, 1).cpu().numpy()

    return to_pixels_np


def encode_latents(ae_dir: str | Path, data: str | Path, out: str | Path, log=print) -> Path:
    """``ddpm-rt encode-latents``: an emoji/pixel ``.npz`` -> the same file with ``latents``
    (N, C, h, w) float32 = (encoder latents - shift) * scale_factor in place of ``images``, plus
    ``latent`` (JSON: scale factor, shape, the autoencoder's folder and weights sha256).
    ``ddpm-rt train --data`` takes it as is."""
    import hashlib

    from ddpm_rt.bundle.fileio import atomic_write

    from .data import _load_array

    model, meta = load_autoencoder(ae_dir)
    arrays = _load_array(Path(data), "data")
    if not isinstance(arrays, dict) or "images" not in arrays:
        raise InputError(f"{data} must be an .npz with an 'images' array")
    images = arrays.pop("images")
    size = meta["autoencoder"]["image_size"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise InputError(
            f"{data}: images must be uint8 (N, {size}, {size}, 3) for this autoencoder, "
            f"got {images.dtype} {images.shape}"
        )
    torch.set_grad_enabled(False)
    raw = encode_images(model, images)
    scale = float(meta["latent"]["scale_factor"])
    latents = to_model_latents(raw, meta["latent"])
    weights = Path(ae_dir) / "model.safetensors"
    info = {
        **meta["latent"],
        "autoencoder": {
            "path": str(Path(ae_dir).resolve()),
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "encoder_sha256": encoder_sha256(model),
            "step": meta["step"],
        },
        "std_after_scaling": float(latents.std()),
    }
    arrays.update(latents=latents, latent=np.array(json.dumps(info)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: np.savez(f, **arrays))
    log(
        f"wrote {out}: {len(latents)} latents {tuple(latents.shape[1:])}, scale factor "
        f"{scale:.4f} (std after scaling {info['std_after_scaling']:.3f})"
    )
    return out


__all__ = [
    "AutoencoderConfig",
    "build_autoencoder",
    "decoder_gflop",
    "encode_latents",
    "load_autoencoder",
    "psnr",
]
