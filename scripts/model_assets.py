"""Make the shipped model's card assets: loss curve and a sample grid for a dozen prompts.

python scripts/model_assets.py CHECKPOINT BUNDLE OUT_DIR
python scripts/model_assets.py BUNDLE OUT_DIR        # the sample grid only
python scripts/model_assets.py --beside PIXEL_BUNDLE LATENT_BUNDLE OUT_PNG
    # a latent model's 64x64 images beside a pixel model's 16x16 ones upscaled (bicubic)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ddpm_rt import Generator
from ddpm_rt.images import make_grid

# four training names, four held-out templates, four free paraphrases (training/paraphrases.py)
PROMPTS = [
    "red apple",
    "thumbs up",
    "light bulb",
    "snowman",
    "a drawing of a bell",
    "a cartoon frog",
    "an illustration showing a rocket",
    "a cartoon pizza",
    "a hot drink in a mug",
    "a sign meaning OK",
    "two musical notes",
    "a closed padlock",
]


def loss_curve(metrics: Path, out: Path, w: int = 640, h: int = 360, pad: int = 48) -> None:
    # A resumed run logs again from its last checkpoint: the later log of a step wins.
    by_step = {r["step"]: r["loss"] for r in map(json.loads, metrics.open())}
    steps = np.array(sorted(by_step), float)
    loss = np.array([by_step[s] for s in sorted(by_step)], float)
    k = max(1, len(loss) // 100)  # smooth to ~100 points for readability
    if k > 1:
        loss = np.convolve(loss, np.ones(k) / k, mode="valid")
        steps = steps[k - 1 :]
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    lo, hi = np.log10(loss.min()), np.log10(loss.max())

    def xy(s, v):
        x = pad + (s - steps.min()) / max(1.0, steps.max() - steps.min()) * (w - 2 * pad)
        y = h - pad - (np.log10(v) - lo) / max(1e-9, hi - lo) * (h - 2 * pad)
        return float(x), float(y)

    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    d.line([xy(s, v) for s, v in zip(steps, loss, strict=True)], fill=(30, 90, 200), width=2)
    d.text((pad, 10), f"training loss (MSE, log scale, smoothed over {k} logs)", fill="black")
    d.text((pad, h - pad + 8), f"step {int(steps.min())}", fill="black")
    d.text((w - pad - 80, h - pad + 8), f"step {int(steps.max())}", fill="black")
    d.text((4, pad - 14), f"{loss.max():.3f}", fill="black")
    d.text((4, h - pad + 2), f"{loss.min():.3f}", fill="black")
    img.save(out)


def sample_grid(bundle: Path, out: Path, per_prompt: int = 6) -> None:
    gen = Generator(bundle)
    images = gen.generate(PROMPTS, num=per_prompt, seed=1)  # the defaults; a row per prompt
    grid = make_grid(images, ncols=per_prompt)
    k = max(1, 64 // images.shape[1])  # 16x16 images shown at x4, 64x64 ones as they are
    Image.fromarray(grid).resize(
        (grid.shape[1] * k, grid.shape[0] * k), Image.Resampling.NEAREST
    ).save(out)


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, 3) uint8 -> (N, size, size, 3), Pillow's bicubic (what a user's viewer does)."""
    return np.stack(
        [
            np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
            for im in images
        ]
    )


def side_by_side(pixel: Path, latent: Path, out: Path, per_prompt: int = 4) -> None:
    """A row per prompt: the pixel model's images upscaled to the latent model's size
    (bicubic), a gap, then the latent model's; each at its own defaults, seed 1."""
    big = Generator(latent).generate(PROMPTS, num=per_prompt, seed=1)
    size = big.shape[1]
    small = upscale(Generator(pixel).generate(PROMPTS, num=per_prompt, seed=1), size)
    rows = []
    for j in range(len(PROMPTS)):
        part = slice(j * per_prompt, (j + 1) * per_prompt)
        left = make_grid(small[part], ncols=per_prompt)
        right = make_grid(big[part], ncols=per_prompt)
        gap = np.full((left.shape[0], 12, 3), 255, np.uint8)
        rows.append(np.concatenate([left, gap, right], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--beside"]:
        side_by_side(*(Path(a) for a in sys.argv[2:5]))
        print(f"wrote {sys.argv[4]} (rows: {', '.join(PROMPTS)})")
        sys.exit(0)
    if len(sys.argv) == 3:  # BUNDLE OUT_DIR: the sample grid only
        sys.argv.insert(1, "")
    ckpt, bundle, out = (Path(a) for a in sys.argv[1:4])
    out.mkdir(parents=True, exist_ok=True)
    if str(ckpt) not in ("", "."):
        loss_curve(ckpt / "metrics.jsonl", out / "loss_curve.png")
    sample_grid(bundle, out / "samples.png")
    print(f"wrote {out / 'loss_curve.png'} and {out / 'samples.png'} (rows: {', '.join(PROMPTS)})")
