"""Images at another size than a judge's, and the 64x64 detail measure (issue 19).

* Recognition stays with the 16x16 judge: larger images are **box**-downsampled to its size
  (Pillow ``Image.Resampling.BOX``, the area average ``ddpm-rt data emoji`` made the renders
  with: box 64 -> 16 of the 64x64 renders is within 2 levels of the 16x16 renders, mean
  absolute difference 0.23 of 255).
* Detail is a Fréchet distance in the features of a judge trained on the 64x64 renders
  (:class:`DetailReference`); smaller images (the 16x16 model's) are **bicubic**-upscaled to
  64 first (Pillow ``Image.Resampling.BICUBIC``), the baseline a latent model must beat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddpm_rt.errors import InputError

from .judge import cached_judge, frechet_distance, judge_outputs

DOWNSAMPLE = "box"
UPSAMPLE = "bicubic"
# Judge training steps for the detail judge: it costs about 2.3x the 16x16 judge per step
# on a CPU; 1,500 steps (the 16x16 judge's count up to 150 concepts) keep it to minutes.
DETAIL_JUDGE_STEPS = 1500


def load_npz(path: str | Path, keys: tuple[str, ...]) -> dict:
    """Every array of an emoji .npz; an unreadable file or a missing key is an InputError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    for k in keys:
        if k not in d:
            raise InputError(f"{path} lacks {k!r}: build it with 'ddpm-rt data emoji'")
    return d


def resize(images: np.ndarray, size: int, resample: str) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, size, size, 3) with Pillow's ``box`` or ``bicubic``."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    mode = {"box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}[resample]
    out = [np.asarray(Image.fromarray(im).resize((size, size), mode)) for im in images]
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def to_size(images: np.ndarray, size: int) -> np.ndarray:
    """``images`` at ``size``: box-downsampled when larger, bicubic-upscaled when smaller."""
    h = images.shape[1]
    return images if h == size else resize(images, size, DOWNSAMPLE if h > size else UPSAMPLE)


class DetailReference:
    """The judge trained (and cached) on every render of a 64x64 data set, and the renders'
    features: :meth:`frechet` gives the detail distance of any images to them."""

    def __init__(self, data: str | Path, steps: int = DETAIL_JUDGE_STEPS, seed: int = 0):
        d = load_npz(data, ("images", "labels", "label_names"))
        self.data, self.steps = str(data), steps
        self.size = int(d["images"].shape[1])
        self.judge = cached_judge(d["images"], d["labels"], len(d["label_names"]), steps, seed)
        self.real_feats = judge_outputs(self.judge, d["images"])[1]

    def frechet(self, images: np.ndarray) -> float:
        return frechet_distance(
            judge_outputs(self.judge, to_size(images, self.size))[1], self.real_feats
        )

    def describe(self) -> dict:
        return {
            "data": self.data,
            "size": self.size,
            "judge_steps": self.steps,
            "upsample": UPSAMPLE,
            "downsample": DOWNSAMPLE,
        }
