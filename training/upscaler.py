"""The cascade's super-resolution decoder (issue 27): the 16x16 model's picture -> 64x64.

Cascaded diffusion (Ho et al. 2021): the base U-Net draws at 16x16 and knows the concepts;
this network adds the detail. Its body is diffusers' ``DecoderTiny`` (the TAESD decoder:
3x3 convs, ReLU, nearest upsampling -- ops every backend runs), the shape of the latent
autoencoder's decoder, fed the 16x16 RGB image plus one constant channel, the
conditioning-augmentation level ``aug`` (Imagen): in training the input is blurred and
noised by a random amount and told how much; at inference a fixed level, chosen by
measurement on the base model's own samples, is baked into the exported graph.

**Recognition is kept by construction.** The last operation is a parameter-free projection

    out = sr - up(box(sr)) + up(x)

(``box``: the 4x4 area average that made the 16x16 data; ``up``: nearest), so that
``box(out) == x`` exactly (before the final clamp to [-1, 1] and rounding to 8 bits):
whatever the 16x16 model drew is what the 64x64 picture averages to, and the network only
adds what averages to zero over each 4x4 block.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_rt.errors import CheckpointError, InputError, first_line

UPSCALER_FORMAT = "ddpm-rt-upscaler"
UPSCALER_VERSION = 1
# Per 64x64 image. The decoder runs once per image at the end of sampling (and for
# previews); issue 27 asks for <= 1.5 GFLOP unless the detail target needs more.
MAX_UPSCALER_GFLOP = 1.5


@dataclass(frozen=True)
class UpscalerConfig:
    width: int = 48
    blocks: tuple[int, ...] = (2, 2, 1)  # DecoderTiny blocks per level; level i < last doubles
    low_size: int = 16  # the base model's image

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if len(self.blocks) < 2 or any(not 0 <= b <= 8 for b in self.blocks):
            raise InputError("upscaler blocks: at least 2 levels of 0..8 blocks")
        if not 4 <= self.width <= 256:
            raise InputError(f"upscaler width must be in [4, 256], got {self.width}")
        if self.low_size < 4 or self.low_size % 4:
            raise InputError(f"low size must be a multiple of 4, got {self.low_size}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.blocks) - 1)

    @property
    def size(self) -> int:
        return self.low_size * self.factor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UpscalerConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def box_down(x: torch.Tensor, f: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/f, W/f): the f x f area average (Pillow's BOX at a whole
    factor)."""
    return F.avg_pool2d(x, f)


def up_nearest(x: torch.Tensor, f: int) -> torch.Tensor:
    """Each pixel repeated f x f (ONNX Resize, nearest: the op DecoderTiny's own
    upsampling exports to)."""
    return F.interpolate(x, scale_factor=float(f), mode="nearest")


def project(sr: torch.Tensor, low: torch.Tensor, f: int) -> torch.Tensor:
    """``sr`` with each f x f block shifted so that its average is ``low``'s pixel."""
    return sr + up_nearest(low - box_down(sr, f), f)


class Upscaler(torch.nn.Module):
    """(B, 3, h, w) in [-1, 1] and an augmentation level (B,) -> (B, 3, fh, fw), projected
    (not clamped: the exported graph clamps)."""

    def __init__(self, cfg: UpscalerConfig):
        super().__init__()
        from diffusers.models.autoencoders.vae import DecoderTiny

        self.cfg = cfg
        n = len(cfg.blocks)
        self.body = DecoderTiny(
            in_channels=4,
            out_channels=3,
            num_blocks=cfg.blocks,
            block_out_channels=(cfg.width,) * n,
            upsampling_scaling_factor=2,
            act_fn="relu",
            upsample_fn="nearest",
        )

    def forward(self, low: torch.Tensor, aug: torch.Tensor, cond: torch.Tensor | None = None):
        """``low``: the clean 16x16 picture the output must average to; ``cond``: what the
        network sees (``low`` augmented in training; ``low`` itself by default)."""
        cond = low if cond is None else cond
        level = aug.reshape(-1, 1, 1, 1).to(cond.dtype).expand(-1, 1, *cond.shape[2:])
        sr = self.body(torch.cat([cond, level], dim=1))
        return project(sr, low, self.cfg.factor)


def fit_in_range(y: torch.Tensor, low: torch.Tensor, f: int) -> torch.Tensor:
    """``y`` (in [-1, 1]) moved, block by block, so that each f x f block averages to
    ``low``'s pixel (in [-1, 1]) while staying in [-1, 1]: a block whose mean is too low
    moves every pixel the same fraction of its way up to 1, one too high the same fraction
    down to -1. Clamping a projected picture moves the averages of blocks that touch the
    range's ends; this restores them exactly, with no second clamp needed."""
    # Relu, Max and Min rather than one-sided clamps: ONNX Runtime's symbolic shape
    # inference (run by int8 calibration) stops at a Clip with an empty bound
    tiny, one = torch.tensor(1e-12, dtype=y.dtype), torch.tensor(1.0, dtype=y.dtype)
    need = low - box_down(y, f)
    room_up = torch.maximum(box_down(1.0 - y, f), tiny)
    room_down = torch.maximum(box_down(y + 1.0, f), tiny)
    a = torch.minimum(torch.relu(need) / room_up, one)
    b = torch.minimum(torch.relu(-need) / room_down, one)
    return y + up_nearest(a, f) * (1.0 - y) - up_nearest(b, f) * (y + 1.0)


class ExportedUpscaler(torch.nn.Module):
    """The bundle's decoder graph: the sampler's 16x16 picture (the latent, scale 1,
    shift 0) -> 64x64 pixels in [-1, 1], the augmentation level baked in. The input is
    clamped to [-1, 1] first, as the 16x16 bundle clamps its picture."""

    def __init__(self, model: Upscaler, aug: float):
        super().__init__()
        self.model, self.aug = model, float(aug)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = latent.clamp(-1.0, 1.0)
        f = self.model.cfg.factor
        # the level's channel as plain arithmetic on the input (Slice, Mul, Add): ONNX
        # Runtime's symbolic shape inference, which int8 calibration runs, follows it
        level = x[:, :1] * 0.0 + self.aug
        sr = self.model.body(torch.cat([x, level], dim=1))
        y = project(sr, x, f).clamp(-1.0, 1.0)
        return fit_in_range(y, x, f).clamp(-1.0, 1.0)  # the last clamp: float rounding only


def upscaler_gflop(cfg: UpscalerConfig) -> float:
    """FLOPs per image (a multiply-add counts 2), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = Upscaler(cfg).eval()
    x = torch.zeros(1, 3, cfg.low_size, cfg.low_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1))
    return counter.get_total_flops() / 1e9


def check_upscaler_cost(cfg: UpscalerConfig) -> float:
    gflop = upscaler_gflop(cfg)
    per_64 = gflop * 64 * 64 / cfg.size**2
    if per_64 > MAX_UPSCALER_GFLOP:
        raise InputError(
            f"the upscaler costs {per_64:.2f} GFLOP per 64x64 image (limit "
            f"{MAX_UPSCALER_GFLOP}); use a smaller --width or fewer --blocks"
        )
    return gflop


def read_upscaler_config(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"no upscaler checkpoint in {ckpt_dir} (config.json missing)"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != UPSCALER_FORMAT:
        raise CheckpointError(f"{path} is not an upscaler checkpoint (ddpm-rt train-upscaler)")
    if meta.get("version") != UPSCALER_VERSION:
        raise CheckpointError(f"{path}: upscaler checkpoint version {meta.get('version')!r}")
    return meta


def load_upscaler(ckpt_dir: str | Path) -> tuple[Upscaler, dict]:
    from safetensors.torch import load_file

    meta = read_upscaler_config(ckpt_dir)
    model = Upscaler(UpscalerConfig.from_dict(meta["upscaler"]))
    try:
        model.load_state_dict(load_file(str(Path(ckpt_dir) / "model.safetensors")))
    except Exception as e:
        raise CheckpointError(f"cannot read the upscaler in {ckpt_dir}: {first_line(e)}") from None
    return model.eval(), meta


__all__ = [
    "MAX_UPSCALER_GFLOP",
    "ExportedUpscaler",
    "Upscaler",
    "UpscalerConfig",
    "box_down",
    "check_upscaler_cost",
    "fit_in_range",
    "load_upscaler",
    "project",
    "read_upscaler_config",
    "up_nearest",
    "upscaler_gflop",
]
