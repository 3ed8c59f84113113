"""A procedurally generated labelled data set: coloured shapes on plain backgrounds.

For demos, tests and benchmarks. Writes the same ``.npz`` format ``ddpm-rt train`` reads:
``images`` (N, H, W, 3) uint8, ``labels`` (N,) int, ``label_names`` ("red circle", ...),
plus ``captions`` ("a small red circle") for text-conditioned training. Deterministic for a
given seed. Needs only NumPy and Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ddpm_rt.bundle.fileio import atomic_write, check_writable
from ddpm_rt.errors import InputError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((245, 245, 245), (200, 200, 200), (90, 90, 90), (235, 225, 200))
SUPERSAMPLE = 4

LABEL_NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _draw(shape: str, colour, bg, size: int, frac: float, cx: float, cy: float) -> np.ndarray:
    s = size * SUPERSAMPLE
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    r = frac * s / 2
    x, y = cx * s, cy * s
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "square":
        r *= 0.85  # same visual area as the circle, roughly
        d.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    else:
        d.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=colour)
    # Area-averaging downsample: anti-aliased edges, no ringing.
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))


def make_shapes(num: int, size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    if num < 1:
        raise InputError(f"--num must be >= 1, got {num}")
    if size < 8 or size % 4:
        raise InputError(f"--size must be a multiple of 4 and >= 8, got {size}")
    rng = np.random.default_rng(seed)
    images = np.empty((num, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, len(LABEL_NAMES), size=num)
    captions = []
    colours = list(COLOURS)
    for i, label in enumerate(labels):
        colour, shape = colours[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
        large = bool(rng.integers(0, 2))
        frac = rng.uniform(0.6, 0.8) if large else rng.uniform(0.35, 0.5)
        margin = frac / 2
        cx, cy = rng.uniform(margin, 1 - margin, size=2)
        bg = BACKGROUNDS[rng.integers(0, len(BACKGROUNDS))]
        images[i] = _draw(shape, COLOURS[colour], bg, size, frac, cx, cy)
        captions.append(f"a {'large' if large else 'small'} {colour} {shape}")
    return {
        "images": images,
        "labels": labels.astype(np.int64),
        "label_names": np.array(LABEL_NAMES),
        "captions": np.array(captions),
    }


def write_shapes(out: str | Path, num: int, size: int = 16, seed: int = 0) -> Path:
    """Generate and write atomically to ``out`` (``.npz`` is appended if missing)."""
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    check_writable(out)
    arrays = make_shapes(num, size, seed)
    return atomic_write(out, lambda f: np.savez_compressed(f, **arrays))
