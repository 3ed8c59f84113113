"""``ddpm-rt eval-autoencoder AE --data emoji64.npz --judge-data emoji16.npz`` (issue 19):
how much of the emoji survives the autoencoder, the ceiling of any latent model built on it.

* PSNR of reconstructions (mean per image, as logged in training), per art style; the
  held-out style is the one the autoencoder never saw.
* Recognition@1/@5 by the 16x16 judge of the originals and of the reconstructions, both
  box-downsampled to 16x16 (:mod:`.detail`): per style with the judge trained on every
  style (the one ``ddpm-rt eval`` scores with), and on the held-out style with the judge
  trained without it (a fair read of unseen drawings).
* The Fréchet distance at 64x64 (:class:`.detail.DetailReference`) of all reconstructions
  to the renders: the floor for a latent model's ``frechet_detail``; beside it the same for
  the renders box-downsampled to 16 and bicubic-upscaled back (a perfect 16x16 model's
  bicubic baseline).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm_rt.core.samplers import to_uint8
from ddpm_rt.errors import InputError

from .autoencoder import decode, encode, load_autoencoder, psnr, to_pixels
from .detail import DETAIL_JUDGE_STEPS, DetailReference, load_npz, to_size
from .evaluate import judge_steps_for, recognition_of
from .judge import cached_judge

KEYS = ("images", "labels", "label_names", "styles")


@torch.no_grad()
def reconstruct(model, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the autoencoder's reconstructions, uint8 (N, H, W, 3)."""
    out = [
        to_uint8(
            decode(model, encode(model, to_pixels(images[i : i + batch]))).clamp(-1, 1).numpy()
        )
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out) if out else images[:0]


def _recognition(judge, images: np.ndarray, labels: np.ndarray) -> dict:
    return {**recognition_of(judge, images, labels)[0], "n": len(labels)}


def evaluate_autoencoder(
    ae_dir: str | Path,
    data: str | Path,
    judge_data: str | Path,
    holdout_style: str = "twemoji",
    judge_steps: int | None = None,
    detail_judge_steps: int = DETAIL_JUDGE_STEPS,
    seed: int = 0,
    log=print,
    recognition: bool = True,
    per_style: bool = True,
) -> dict:
    """The report above. ``recognition=False``: PSNR and the Fréchet floor only (no 16x16
    judge is trained); ``per_style=False``: recognition on the held-out style only (one
    16x16 judge to train instead of two)."""
    model, meta = load_autoencoder(ae_dir)
    big, small = load_npz(data, KEYS), load_npz(judge_data, KEYS)
    for k in ("labels", "styles"):
        if not np.array_equal(big[k], small[k]):
            raise InputError(f"{data} and {judge_data} are not the same renders ({k} differ)")
    images, labels = big["images"], big["labels"]
    styles = big["styles"].astype(str)
    if holdout_style not in set(styles):
        raise InputError(f"no images of style {holdout_style!r} in {data}")
    k, size = len(big["label_names"]), small["images"].shape[1]
    judge_steps = judge_steps or judge_steps_for(k)
    recon = reconstruct(model, images)
    report: dict = {
        "autoencoder": str(ae_dir),
        "step": meta.get("step"),
        "data": str(data),
        "judge_data": str(judge_data),
        "holdout_style": holdout_style,
        "judge_steps": judge_steps,
        "judged_at": size,
        "styles": {},
    }
    held = styles == holdout_style
    for style in sorted(set(styles)):
        report["styles"][style] = {"psnr": psnr(model, images[styles == style])}
        log(f"{style}: PSNR {report['styles'][style]['psnr']:.2f} dB")
    report["heldout"] = {"psnr": report["styles"][holdout_style]["psnr"]}
    if recognition:
        what = (images, recon, labels, styles, held)
        _judged(report, small["images"], what, k, per_style, seed, log)
    detail = DetailReference(data, steps=detail_judge_steps, seed=seed)
    report["detail"] = {
        **detail.describe(),
        "frechet_reconstructions": detail.frechet(recon),
        "frechet_renders_bicubic": detail.frechet(to_size(to_size(images, size), detail.size)),
        # one image per concept, as many as one prompt set of 'ddpm-rt eval' at per_concept 1
        # (the distance grows as the sample shrinks): the held-out style's reconstructions
        # and, for a perfect model of that one style, its renders
        "frechet_reconstructions_heldout": detail.frechet(recon[held]),
        "frechet_renders_heldout": detail.frechet(images[held]),
        "n_heldout": int(held.sum()),
    }
    log(
        f"Fréchet at {detail.size}x{detail.size}: reconstructions "
        f"{report['detail']['frechet_reconstructions']:.2f} (the floor), renders via "
        f"{size}x{size} + bicubic {report['detail']['frechet_renders_bicubic']:.2f}; "
        f"{holdout_style} only (n {held.sum()}): reconstructions "
        f"{report['detail']['frechet_reconstructions_heldout']:.2f}, renders "
        f"{report['detail']['frechet_renders_heldout']:.2f}"
    )
    return report


def _judged(report, renders, what, k, per_style, seed, log) -> None:
    """Recognition of originals and reconstructions, box-downsampled to the judge's size."""
    images, recon, labels, styles, held = what
    size, steps, holdout_style = renders.shape[1], report["judge_steps"], report["holdout_style"]
    judge = cached_judge(renders, labels, k, steps=steps, seed=seed) if per_style else None
    for style in sorted(set(styles)) if per_style else ():
        pick = styles == style
        r = report["styles"][style]
        r["originals"] = _recognition(judge, to_size(images[pick], size), labels[pick])
        r["reconstructions"] = _recognition(judge, to_size(recon[pick], size), labels[pick])
        log(
            f"{style}: recognition@5 originals {r['originals']['top5']:.3f}, "
            f"reconstructions {r['reconstructions']['top5']:.3f}"
        )
    fair = cached_judge(renders[~held], labels[~held], k, steps=steps, seed=seed)
    report["heldout"].update(
        {
            "renders": _recognition(fair, renders[held], labels[held]),
            "originals": _recognition(fair, to_size(images[held], size), labels[held]),
            "reconstructions": _recognition(fair, to_size(recon[held], size), labels[held]),
        }
    )
    h = report["heldout"]
    log(
        f"held-out {holdout_style}, judge without it: recognition@1/@5 originals "
        f"{h['originals']['top1']:.3f}/{h['originals']['top5']:.3f}, reconstructions "
        f"{h['reconstructions']['top1']:.3f}/{h['reconstructions']['top5']:.3f}"
    )
