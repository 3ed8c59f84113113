"""An independent emoji-naming judge for evaluation: a small CNN trained on the data set's
renders. It names the emoji (identity, not category). Eval tooling only, never the runtime.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import nn

from ddpm_rt.backends.ort_cache import cache_root, enabled
from ddpm_rt.bundle.fileio import atomic_write

# Bump when Judge, _augment or train_judge change what a given seed trains.
JUDGE_VERSION = 1
# The size the judge's body was designed at (the 16x16 renders); larger images go through a
# stem that halves them down to it first.
BODY_SIZE = 16


class Judge(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> logits (B, K); ``features`` gives the 128-d penultimate.

    ``image_size`` above :data:`BODY_SIZE` adds a stem: per halving, a 3x3 convolution at the
    full resolution (16, then 32 channels) and a 2x2 max-pool, so the 64x64 judge sees every
    pixel yet costs about twice the 16x16 one. At ``image_size`` <= 16 there is no stem and
    the module (and its state dict) is the original judge's, so cached judges stay valid."""

    def __init__(self, num_classes: int, width: int = 48, image_size: int = BODY_SIZE):
        super().__init__()
        w = width
        stem, c, size = [], 3, image_size
        while size > BODY_SIZE:
            out = min(2 * c if stem else 16, w)  # 16, 32, 48 channels
            stem += [nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(8, out), nn.GELU()]
            stem.append(nn.MaxPool2d(2))
            c, size = out, size // 2
        self.stem = nn.Sequential(*stem)  # empty (the identity, no weights) at 16x16
        self.body = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w, 128),
            nn.GELU(),
        )
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shifts of up to 1/16 of the image (1 px at 16x16, 4 at 64x64), brightness/contrast
    jitter and light noise: enough variety for the judge to accept a generated image that is
    not pixel-identical to a render."""
    b = x.shape[0]
    s = max(1, x.shape[2] // BODY_SIZE)
    padded = nn.functional.pad(x, (s, s, s, s), mode="replicate")
    dx, dy = torch.randint(0, 2 * s + 1, (2,), generator=gen).tolist()
    x = padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    scale = 1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    shift = 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    noise = 0.05 * torch.randn(x.shape, generator=gen)
    return (x * scale + shift + noise).clamp(-1, 1)


def train_judge(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    steps: int = 1500,
    seed: int = 0,
    log=None,
) -> Judge:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    judge = Judge(num_classes, image_size=images.shape[1])
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    x_all, y_all = _to_tensor(images), torch.from_numpy(labels)
    for step in range(steps):
        idx = torch.randint(0, len(x_all), (128,), generator=gen)
        loss = nn.functional.cross_entropy(
            judge(_augment(x_all[idx], gen)), y_all[idx], label_smoothing=0.1
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step + 1) % 500 == 0:
            log(f"judge step {step + 1}/{steps}: loss {loss.item():.3f}")
    return judge.eval()


def cached_judge(
    images: np.ndarray, labels: np.ndarray, num_classes: int, steps: int, seed: int = 0
) -> Judge:
    """:func:`train_judge`, kept in the per-user cache (``<cache>/judges/``, the ORT cache's
    root; off with ``DDPM_RT_NO_CACHE=1``) keyed by the sha256 of the images, labels and
    every training setting, the torch version and :data:`JUDGE_VERSION`: evaluations of
    several bundles on one data set train each judge once (4,310 steps at 431 concepts)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    h = hashlib.sha256()
    for a in (np.ascontiguousarray(images), np.ascontiguousarray(labels)):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(json.dumps([num_classes, steps, seed, torch.__version__, JUDGE_VERSION]).encode())
    path = cache_root() / "judges" / f"{h.hexdigest()}.safetensors"
    if enabled() and path.is_file():
        judge = Judge(num_classes, image_size=images.shape[1])
        try:
            judge.load_state_dict(load_file(str(path)))
            return judge.eval()
        except (OSError, RuntimeError, ValueError, SafetensorError):
            pass  # a damaged entry: train again and rewrite it
    judge = train_judge(images, labels, num_classes, steps=steps, seed=seed)
    if enabled():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous() for k, v in judge.state_dict().items()}
            atomic_write(path, lambda f: f.write(save(state)))
        except OSError:
            pass  # an unwritable cache just means no cache
    return judge


@torch.no_grad()
def judge_outputs(judge: Judge, images: np.ndarray, batch: int = 256):
    """(logits (N, K), features (N, 128)) for uint8 (N, H, W, 3) images."""
    logits, feats = [], []
    for i in range(0, len(images), batch):
        f = judge.features(_to_tensor(images[i : i + batch]))
        feats.append(f)
        logits.append(judge.head(f))
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float((top == labels[:, None]).any(1).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as in FID)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def sqrtm_psd(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root_a = sqrtm_psd(cov_a)
    cross = sqrtm_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cross))
