"""The conditional U-Net ("ContextUnet") of the course this project grew from.

Residual conv blocks, two down levels, a pooled hidden vector, and two up levels where the
time embedding is added and the context embedding multiplied in:
``up = context_embedding * up + time_embedding``.

Differences from the course code, on purpose:

* The residual block's 1x1 shortcut (used when in/out channels differ) is a registered
  layer. The course created a fresh, randomly initialised ``nn.Conv2d`` inside
  ``forward()``: its weights were never trained, changed on every call and were absent
  from the checkpoint.
* GroupNorm instead of BatchNorm in the residual blocks: batch statistics depend on the mix
  of timesteps in a batch and on batch size, which diverges between training and sampling
  (and interacts badly with EMA weights); GroupNorm has no running state.
* Any image size divisible by 4, not only 16x16: the pooled vector uses a global average
  and the first up-convolution's kernel is the (H/4, W/4) size.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ddpm_rt.errors import InputError, first_line

NORMS = ("group", "batch", "ws")
ACTIVATIONS = ("gelu", "relu")
# ReLU's gain (NF-Nets): relu(g*z) keeps E[out^2] = E[z^2] for unit-normal z.
_RELU_GAIN = (2 / (1 - 1 / math.pi)) ** 0.5


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3
    n_feat: int = 64
    context_dim: int = 10
    height: int = 16
    width: int = 16
    groups: int = 8
    # How the context embedding multiplies the up path: "linear" is the course's
    # c_emb * h; "tanh" bounds the multiplier as (1 + tanh(c_emb)) * h, so the null context
    # and unseen prompts cannot flip or blow up features (better behaved under guidance).
    context_gate: str = "linear"
    # Capacity knobs (issue 11), defaults = the course architecture:
    blocks: int = 2  # residual conv blocks per down/up level
    attention: bool = False  # self-attention over the H/4 x W/4 features
    # "learned": a trained vector replaces an all-zero context inside the graph, so the
    # runtime's null context (zeros) keeps meaning "unconditional" at the interface.
    null_context: str = "zero"
    # The residual blocks' normalisation and activation (issue 19's int8 experiment).
    # "group" + "gelu" is the default. "batch" (BatchNorm) and "ws" (scaled weight
    # standardisation, no activation norm) both leave a plain Conv at export: BatchNorm's
    # eval-mode affine folds into the convolution, a standardised weight is a constant.
    # With "relu" the int8 graph is QLinearConv(+ReLU) end to end inside the blocks.
    norm: str = "group"
    activation: str = "gelu"
    # Issue 29: a guidance-distilled student takes the guidance scale w as a 4th input,
    # ``forward(x, t, c, w)``; its embedding is added where the time embedding is. Off (the
    # default) the model, its outputs and its state_dict keys are those of before.
    guidance_embedding: bool = False

    def __post_init__(self):
        if self.height % 4 or self.width % 4 or self.height < 4 or self.width < 4:
            raise InputError(f"image size must be divisible by 4, got {self.height}x{self.width}")
        if self.n_feat % self.groups:
            raise InputError(f"n_feat ({self.n_feat}) must be a multiple of groups ({self.groups})")
        if self.context_dim < 1:
            raise InputError(f"context_dim must be >= 1, got {self.context_dim}")
        if self.context_gate not in ("linear", "tanh"):
            raise InputError(f"context_gate must be linear or tanh, got {self.context_gate!r}")
        if not 1 <= self.blocks <= 8:
            raise InputError(f"blocks must be in [1, 8], got {self.blocks}")
        if self.null_context not in ("zero", "learned"):
            raise InputError(f"null_context must be zero or learned, got {self.null_context!r}")
        if self.norm not in NORMS:
            raise InputError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise InputError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.guidance_embedding:  # ordinary models' configs read as before issue 29
            del d["guidance_embedding"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class WSConv2d(nn.Conv2d):
    """Scaled weight standardisation (Brock et al. 2021): each output channel's weights are
    centred and scaled to variance 1/fan_in, times a learned gain; no activation statistics,
    so nothing depends on the batch, and the exported weight is a constant of the graph."""

    def __init__(self, in_ch: int, out_ch: int, gain: float = 1.0):
        super().__init__(in_ch, out_ch, 3, 1, 1)
        self.gain = nn.Parameter(torch.full((out_ch, 1, 1, 1), gain))

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) * torch.rsqrt(var * w[0].numel() + 1e-4) * self.gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.standardized_weight(), self.bias, 1, 1)


def fold_for_export(model: nn.Module) -> nn.Module:
    """A copy whose :class:`WSConv2d` layers are the plain convolutions they compute (same
    outputs), so an exported graph holds constant weights, not the standardisation."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, WSConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, 3, 1, 1)
                with torch.no_grad():
                    conv.weight.copy_(child.standardized_weight())
                    conv.bias.copy_(child.bias)
                setattr(parent, name, conv.train(child.training))
    return model


def _conv_unit(in_ch: int, out_ch: int, groups: int, norm: str, act: str) -> nn.Sequential:
    """conv 3x3 -> norm -> activation, as the config names them."""
    a = nn.GELU() if act == "gelu" else nn.ReLU()
    if norm == "ws":
        return nn.Sequential(WSConv2d(in_ch, out_ch, _RELU_GAIN if act == "relu" else 1.0), a)
    n = nn.GroupNorm(groups, out_ch) if norm == "group" else nn.BatchNorm2d(out_ch)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, 1, 1), n, a)


class ResidualConvBlock(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        groups: int,
        is_res: bool = False,
        norm: str = "group",
        act: str = "gelu",
    ):
        super().__init__()
        self.is_res = is_res
        self.conv1 = _conv_unit(in_ch, out_ch, groups, norm, act)
        self.conv2 = _conv_unit(out_ch, out_ch, groups, norm, act)
        # Registered (trained, saved) shortcut when a residual block changes channel count.
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if is_res and in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.conv1(x))
        if not self.is_res:
            return h
        return (self.shortcut(x) + h) / 1.414  # keep the variance of the sum near 1


def _blocks(in_ch: int, out_ch: int, groups: int, n: int, kind: tuple = ()) -> list[nn.Module]:
    return [
        ResidualConvBlock(in_ch if i == 0 else out_ch, out_ch, groups, False, *kind)
        for i in range(n)
    ]


class UnetDown(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, blocks: int = 2, kind: tuple = ()):
        super().__init__()
        self.model = nn.Sequential(*_blocks(in_ch, out_ch, groups, blocks, kind), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetUp(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, blocks: int = 2, kind: tuple = ()):
        super().__init__()
        self.model = nn.Sequential(
            nn.ConvTranspose2d(in_ch, out_ch, 2, 2), *_blocks(out_ch, out_ch, groups, blocks, kind)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.model(torch.cat((x, skip), 1))


class SelfAttention(nn.Module):
    """Residual multi-head self-attention over the positions of a (B, C, H, W) map, written
    with 1x1 convolutions, MatMul and Softmax only (plain ONNX ops every backend runs)."""

    def __init__(self, channels: int, groups: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, d, h * w).unbind(1)
        weights = torch.softmax(q.transpose(-1, -2) @ k * d**-0.5, dim=-1)  # (B, heads, N, N)
        out = (v @ weights.transpose(-1, -2)).reshape(b, c, h, w)
        return x + self.proj(out)


class EmbedFC(nn.Module):
    def __init__(self, input_dim: int, emb_dim: int):
        super().__init__()
        self.input_dim = input_dim
        self.model = nn.Sequential(
            nn.Linear(input_dim, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.reshape(-1, self.input_dim))


class ContextUnet(nn.Module):
    """eps = ContextUnet(x (B,C,H,W), t (B,1) = timestep / T, c (B,D))."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        n, g, d = config.n_feat, config.groups, config.context_dim
        kind = (config.norm, config.activation)
        self.init_conv = ResidualConvBlock(config.in_channels, n, g, True, *kind)
        nb = config.blocks
        self.down1 = UnetDown(n, n, g, nb, kind)
        self.down2 = UnetDown(n, 2 * n, g, nb, kind)
        self.attn = SelfAttention(2 * n, g) if config.attention else nn.Identity()
        if config.null_context == "learned":
            self.null = nn.Parameter(torch.zeros(d))
        self.to_vec = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.GELU())
        self.timeembed1 = EmbedFC(1, 2 * n)
        self.timeembed2 = EmbedFC(1, n)
        self.contextembed1 = EmbedFC(d, 2 * n)
        self.contextembed2 = EmbedFC(d, n)
        if config.guidance_embedding:
            # Zero last layers: the embedding starts at 0, so a student made from a teacher
            # starts as the teacher's conditional prediction (``init_from`` copies the rest).
            self.guidanceembed1 = EmbedFC(1, 2 * n)
            self.guidanceembed2 = EmbedFC(1, n)
            for emb in (self.guidanceembed1, self.guidanceembed2):
                nn.init.zeros_(emb.model[-1].weight)
                nn.init.zeros_(emb.model[-1].bias)
        k = (config.height // 4, config.width // 4)
        self.up0 = nn.Sequential(
            nn.ConvTranspose2d(2 * n, 2 * n, k, k), nn.GroupNorm(g, 2 * n), nn.ReLU()
        )
        self.up1 = UnetUp(4 * n, n, g, nb, kind)
        self.up2 = UnetUp(2 * n, n, g, nb, kind)
        self.out = nn.Sequential(
            nn.Conv2d(2 * n, n, 3, 1, 1),
            nn.GroupNorm(g, n),
            nn.ReLU(),
            nn.Conv2d(n, config.in_channels, 3, 1, 1),
        )

    def _gate(self, e: torch.Tensor) -> torch.Tensor:
        return 1.0 + torch.tanh(e) if self.config.context_gate == "tanh" else e

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``w`` (B, 1): the guidance scale, for (and only for) a ``guidance_embedding`` model."""
        n = self.config.n_feat
        if (w is not None) != self.config.guidance_embedding:
            raise TypeError(
                "a guidance_embedding model takes w (B, 1)"
                if w is None
                else "w is an input of guidance_embedding models only"
            )
        x = self.init_conv(x)  # (B, n, H, W)
        down1 = self.down1(x)  # (B, n, H/2, W/2)
        down2 = self.attn(self.down2(down1))  # (B, 2n, H/4, W/4)
        if self.config.null_context == "learned":  # an all-zero context row -> the learned null
            c = torch.where((c == 0).all(dim=1, keepdim=True), self.null.expand_as(c), c)
        hidden = self.to_vec(down2)  # (B, 2n, 1, 1)
        cemb1 = self._gate(self.contextembed1(c)).view(-1, 2 * n, 1, 1)
        temb1 = self.timeembed1(t).view(-1, 2 * n, 1, 1)
        cemb2 = self._gate(self.contextembed2(c)).view(-1, n, 1, 1)
        temb2 = self.timeembed2(t).view(-1, n, 1, 1)
        if w is not None:  # added where (and as) the time embedding is
            temb1 = temb1 + self.guidanceembed1(w).view(-1, 2 * n, 1, 1)
            temb2 = temb2 + self.guidanceembed2(w).view(-1, n, 1, 1)
        up1 = self.up0(hidden)  # (B, 2n, H/4, W/4)
        up2 = self.up1(cemb1 * up1 + temb1, down2)  # (B, n, H/2, W/2)
        up3 = self.up2(cemb2 * up2 + temb2, down1)  # (B, n, H, W)
        return self.out(torch.cat((up3, x), 1))  # (B, C, H, W)


PREDICTIONS = ("eps", "v")


class EpsFromV(nn.Module):
    """A v-predicting U-Net (Salimans & Ho 2022, v = alpha_t eps - sigma_t x0) as the eps
    predictor the runtime's samplers take: eps = sigma_t x_t + alpha_t v, exactly, with
    alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t) looked up at the integer timestep
    round(t_in * T) (``t_in`` = ``timestep_input(t, T)``). Traces to Mul/Round/Cast/Gather;
    the tables are constants of the graph (not in the state_dict: the checkpoint's weights
    are the inner model's, keys unchanged). A checkpoint whose config.json says
    ``"prediction": "v"`` is loaded wrapped by :func:`load_model`."""

    def __init__(self, net: ContextUnet, alpha_bar: np.ndarray):
        super().__init__()
        self.net = net
        ab = np.asarray(alpha_bar, dtype=np.float64)  # t = 0..T
        self.timesteps = len(ab) - 1
        self.register_buffer("alpha", torch.from_numpy(np.sqrt(ab).astype(np.float32)), False)
        self.register_buffer("sigma", torch.from_numpy(np.sqrt(1 - ab).astype(np.float32)), False)

    @property
    def config(self) -> UNetConfig:
        return self.net.config

    def table_index(self, t: torch.Tensor) -> torch.Tensor:
        return torch.round(t.reshape(-1) * self.timesteps).long().clamp(0, self.timesteps)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        v = self.net(x, t, c, w)
        i = self.table_index(t)
        return self.sigma[i].view(-1, 1, 1, 1) * x + self.alpha[i].view(-1, 1, 1, 1) * v


def eps_model(net: ContextUnet, prediction: str, alpha_bar: np.ndarray) -> nn.Module:
    """``net`` as an eps predictor: itself for "eps", wrapped in :class:`EpsFromV` for "v"."""
    if prediction not in PREDICTIONS:
        raise InputError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    return net if prediction == "eps" else EpsFromV(net, alpha_bar)


CHECKPOINT_FORMAT = "ddpm-rt-checkpoint"
CHECKPOINT_VERSION = 1


def read_checkpoint_config(
    ckpt_dir, fmt: str = CHECKPOINT_FORMAT, version: int = CHECKPOINT_VERSION, what="checkpoint"
) -> dict:
    """The checkpoint's ``config.json`` (model, schedule, conditioning, training state);
    ``fmt``/``version``/``what`` let other checkpoint kinds (the autoencoder's) share it."""
    from pathlib import Path

    from ddpm_rt.errors import CheckpointError

    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        article = "an" if what[0] in "aeiou" else "a"
        raise CheckpointError(f"not {article} {what} (no config.json): {ckpt_dir}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt {path}: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != fmt:
        raise CheckpointError(f"{path} is not a ddpm-rt {what} config")
    if cfg.get("version", 0) > version:
        raise CheckpointError(f"{path} is from a newer ddpm-rt; upgrade to read it")
    return cfg


def load_model(ckpt_dir, weights: str = "model.safetensors") -> tuple[ContextUnet, dict]:
    """Rebuild the model from the config stored beside its weights (EMA weights by default).
    A v-predicting one (``"prediction": "v"``, from ``ddpm-rt distill``) comes wrapped in
    :class:`EpsFromV`: what is returned always predicts eps."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ddpm_rt.errors import CheckpointError

    cfg = read_checkpoint_config(ckpt_dir)
    model = ContextUnet(UNetConfig.from_dict(cfg["unet"]))
    path = Path(ckpt_dir) / weights
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights missing: {path}")
    try:
        state = load_file(str(path))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot load {path}: {first_line(e)}") from None
    if cfg.get("prediction", "eps") != "eps":
        from ddpm_rt.core.schedule import NoiseSchedule, ScheduleConfig

        schedule = NoiseSchedule(ScheduleConfig.from_dict(cfg["schedule"]))
        model = eps_model(model, cfg["prediction"], schedule.alpha_bar64)
    return model.eval(), cfg
