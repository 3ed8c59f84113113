"""``ddpm-rt cascade``: a 16x16 pixel bundle + a trained upscaler -> a cascade bundle (issue 27).

The cascade is a latent bundle whose latent is the base model's picture (``latent.kind:
"pixels"``: 3 channels, scale factor 1, shift 0) and whose decoder graph is the
super-resolution network (:mod:`ddpm_rt.training.upscaler`) with its conditioning
augmentation level baked in. Every file of the base bundle is copied byte for byte (the
U-Net, its precision variants and the text encoder are the same graphs, with the same
parity records); the decoder is traced, parity-checked against torch like a latent
bundle's decoder, and the manifest is written last and loaded back under the strict
validation generation uses.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

import ddpm_rt
from ddpm_rt.bundle.bundle import MANIFEST, Bundle
from ddpm_rt.bundle.fileio import atomic_write, sha256_file
from ddpm_rt.bundle.io_spec import decoder_io
from ddpm_rt.errors import InputError

from .decoder_export import check_decoder_parity, decoder_parity_inputs
from .tracing import ExportConfig, trace_to_onnx


def build_cascade(
    base: str | Path,
    upscaler: str | Path,
    out: str | Path,
    aug: float | None = None,
    force: bool = False,
    log=print,
) -> Path:
    """Write the cascade bundle ``out``; returns its path. ``aug``: the conditioning
    augmentation level the decoder runs at (default: the checkpoint's ``inference_aug``,
    else 0)."""
    from ddpm_rt.training.upscaler import ExportedUpscaler, load_upscaler

    base, out = Path(base), Path(out)
    if out.resolve() == base.resolve():
        raise InputError("--out must be another folder than the base bundle")
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force to replace it")
    b = Bundle.load(base, hash_all=True)
    if b.latent is not None:
        raise InputError(f"{base} is already a latent bundle; the base must draw pixels")
    model, meta = load_upscaler(upscaler)
    cfg = model.cfg
    c, h, w = b.image_shape
    if (h, w) != (cfg.low_size, cfg.low_size):
        raise InputError(
            f"the upscaler takes {cfg.low_size}x{cfg.low_size} pictures; {base} draws {h}x{w}"
        )
    level = float(meta.get("inference_aug", 0.0) if aug is None else aug)
    if not 0.0 <= level <= 10.0:
        raise InputError(f"--aug must be in [0, 10], got {level}")
    module = ExportedUpscaler(model, level).eval()
    H, W = h * cfg.factor, w * cfg.factor
    spec = decoder_io(3, h, w, H, W)
    if spec.file in b.manifest["files"]:
        raise InputError(f"{base} already has a file named {spec.file}")

    example = (torch.from_numpy(decoder_parity_inputs(spec, 2)["latent"]),)
    data = trace_to_onnx(module, example, spec, ExportConfig.opset)
    parity = check_decoder_parity(module, data, spec)
    for p in parity:
        log(f"parity decoder batch {p['batch']}: max |onnx - torch| = {p['max_abs_err']:.2e} (ok)")

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in b.manifest["files"]:
        shutil.copyfile(b.file_path(name), out / name)
    atomic_write(out / spec.file, lambda f: f.write(data))
    m = copy.deepcopy(b.manifest)
    m["image"] = {"channels": 3, "height": H, "width": W}
    m["requires"] = sorted({*m.get("requires", []), "latent"})
    m["graphs"][spec.name] = spec.to_dict()
    m["files"][spec.file] = {
        "sha256": sha256_file(out / spec.file),
        "bytes": (out / spec.file).stat().st_size,
    }
    m.setdefault("parity", {})["decoder"] = parity
    m["latent"] = {
        "kind": "pixels",
        "channels": 3,
        "height": h,
        "width": w,
        "scale_factor": 1.0,
        "shift": [0.0, 0.0, 0.0],
        "decoder": {"graphs": {"fp32": spec.name}, "default_precision": "fp32"},
        "upscaler": {
            "sha256": sha256_file(Path(upscaler) / "model.safetensors"),
            "step": meta.get("step"),
            "config": meta.get("upscaler"),
            "gflop": meta.get("gflop"),
            "aug": level,
            "psnr_heldout": meta.get("psnr_heldout"),
            "psnr_bicubic": meta.get("psnr_bicubic"),
            "holdout_style": meta.get("holdout_style"),
        },
    }
    m["source"] = {
        **(m.get("source") or {}),
        "cascade_base": {"digest": b.digest},  # the 16x16 bundle's manifest sha256
    }
    m["producer"] = {**(m.get("producer") or {}), "ddpm_rt": ddpm_rt.__version__}
    text = json.dumps(m, indent=2).encode()
    atomic_write(out / MANIFEST, lambda f: f.write(text))
    Bundle.load(out, hash_all=True)  # the strict check generation does
    log(f"wrote {out}: {c}x{h}x{w} base pictures, {H}x{W} images (decoder at aug {level:g})")
    return out


__all__ = ["build_cascade"]
