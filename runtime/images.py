"""Images out: PNG files and grids, via Pillow, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .fileio import atomic_write


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 image."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid


def save_png(
    path: str | Path, images: np.ndarray, scale: int = 1, ncols: int | None = None
) -> Path:
    """Write one image (H, W, 3) or a batch (N, H, W, 3) -- several become one grid."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"output must be a .png file, got {path}")
    if images.ndim == 4:
        images = images[0] if len(images) == 1 else make_grid(images, ncols)
    img = Image.fromarray(images, "RGB")
    if scale != 1:
        if scale < 1:
            raise InputError(f"scale must be >= 1, got {scale}")
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return atomic_write(path, lambda f: img.save(f, format="PNG"))
