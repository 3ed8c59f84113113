"""A latent U-Net's decoder graph for its bundle (issue 19): the autoencoder the U-Net was
trained with (checked by weights, or by encoder for a fine-tuned decoder), traced with the
latent's un-scaling folded in, parity-checked against torch, and the manifest's ``latent``
object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ddpm_rt.bundle.fileio import atomic_write, sha256_file
from ddpm_rt.bundle.io_spec import GraphIO, decoder_io
from ddpm_rt.errors import InputError
from ddpm_rt.tolerances import TOLERANCES, check

from .tracing import ExportConfig, ExportError, trace_to_onnx


class LatentDecoder(torch.nn.Module):
    """The bundle's decoder graph: the U-Net's latents (scaled, shifted) -> pixels in
    [-1, 1]. The un-scaling ``x / scale_factor + shift`` is part of the graph (the training
    side's own :func:`from_model_latents`), so a caller feeds it what the sampler produced
    and nothing else."""

    def __init__(self, autoencoder: torch.nn.Module, info: dict):
        super().__init__()
        self.ae = autoencoder
        self.info = {"scale_factor": float(info["scale_factor"]), "shift": info.get("shift")}
        if self.info["shift"] is None:
            self.info["shift"] = [0.0] * autoencoder.config.latent_channels

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        from ddpm_rt.training.autoencoder import decode, from_model_latents

        return decode(self.ae, from_model_latents(latent, self.info)).clamp(-1.0, 1.0)


@dataclass
class _Decoder:
    module: LatentDecoder
    info: dict  # the U-Net checkpoint's ``latent`` record
    ae_meta: dict  # the autoencoder's config.json
    sha256: str  # of its model.safetensors


def decoder_for_bundle(cfg: ExportConfig, info: dict) -> _Decoder:
    """The autoencoder a latent U-Net was trained with (its weights' sha256 must match the
    checkpoint's record), as the bundle's decoder module."""
    from ddpm_rt.training.autoencoder import load_autoencoder

    rec = info.get("autoencoder", {})
    src = Path(cfg.autoencoder or rec.get("path", ""))
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise InputError(
            f"the autoencoder this latent model was trained with is not at {src}; pass "
            "--autoencoder with its folder"
        )
    sha = sha256_file(weights)
    ae, ae_meta = load_autoencoder(src)
    if sha != rec.get("sha256") and not _same_latent_space(ae, ae_meta, rec, info):
        raise ExportError(
            f"autoencoder in {src} is not the one this model was trained with (sha256 "
            "differs, and so does its encoder or latent scaling); pass --autoencoder with "
            "the right folder"
        )
    module = LatentDecoder(ae, info).eval()
    return _Decoder(module, info, ae_meta, sha)


def _same_latent_space(ae, ae_meta: dict, rec: dict, info: dict) -> bool:
    """A decoder fine-tuned on the frozen encoder (same encoder weights, same shift and
    scale factor) decodes the latents the U-Net was trained on."""
    import math

    from ddpm_rt.training.autoencoder import encoder_sha256

    lat = ae_meta.get("latent", {})
    mine = [lat.get("scale_factor"), *(lat.get("shift") or [])]
    theirs = [info.get("scale_factor"), *(info.get("shift") or [])]
    return (
        rec.get("encoder_sha256") is not None
        and encoder_sha256(ae) == rec["encoder_sha256"]
        and len(mine) == len(theirs)
        and all(
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
            for a, b in zip(mine, theirs, strict=True)
        )
    )


def decoder_parity_inputs(spec: GraphIO, batch: int, seed: int = 0) -> dict:
    _, c, h, w = spec.inputs[0].shape
    rng = np.random.default_rng(seed + batch)
    return {"latent": rng.standard_normal((batch, c, h, w), dtype=np.float32)}


def check_decoder_parity(module, onnx_bytes: bytes, spec: GraphIO, batches=(1, 8)) -> list:
    """Torch vs ONNX Runtime (CPU, fp32) on unit-normal latents (what the sampler hands the
    decoder, roughly); raises ExportError on a miss."""
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    report = []
    for b in batches:
        feeds = decoder_parity_inputs(spec, b)
        with torch.no_grad():
            ref = module(torch.from_numpy(feeds["latent"])).numpy()
        got = sess.run(["image"], feeds)[0]
        ok, _ = check("ort", "decoder-fp32", got, ref)
        err = float(np.abs(got - ref).max())
        report.append({"batch": b, "max_abs_err": err, "ok": ok})
        if not ok:
            raise ExportError(
                f"the decoder's ONNX Runtime output differs from torch at batch {b} (max abs "
                f"error {err:.3g}, tolerance {TOLERANCES[('ort', 'decoder-fp32')]})"
            )
    return report


def add_decoder(
    cfg: ExportConfig, dec: _Decoder, out: Path, graphs: dict, files: dict, reuse, old, log
) -> tuple[dict, list]:
    """Trace (or reuse) the decoder graph; returns the manifest's ``latent`` object and the
    decoder's parity report."""
    info = dec.info
    c, h, w, size = (int(info[k]) for k in ("channels", "height", "width", "image_size"))
    spec = decoder_io(c, h, w, size, size)
    path = out / spec.file
    if (
        reuse
        and path.is_file()
        and old["files"].get(spec.file, {}).get("sha256") == sha256_file(path)
    ):
        log(f"reusing {path} (exported from the same autoencoder weights)")
        parity = old.get("parity", {}).get("decoder")
    else:
        example = (torch.from_numpy(decoder_parity_inputs(spec, 2)["latent"]),)
        data = trace_to_onnx(dec.module, example, spec, cfg.opset)
        parity = check_decoder_parity(dec.module, data, spec, cfg.parity_batches)
        for p in parity:
            err = p["max_abs_err"]
            log(f"parity decoder batch {p['batch']}: max |onnx - torch| = {err:.2e} (ok)")
        atomic_write(path, lambda f: f.write(data))
        log(f"wrote {path} ({len(data) / 1e6:.1f} MB)")
    graphs[spec.name] = spec.to_dict()
    files[spec.file] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    ae = dec.ae_meta
    latent = {
        "channels": c,
        "height": h,
        "width": w,
        "scale_factor": float(info["scale_factor"]),
        "decoder": {"graphs": {"fp32": spec.name}, "default_precision": "fp32"},
        "autoencoder": {
            "sha256": dec.sha256,
            "step": ae.get("step"),
            "config": ae.get("autoencoder"),
            "decoder_gflop": ae.get("decoder_gflop"),
            "psnr_heldout": ae.get("psnr_heldout"),
            "holdout_style": ae.get("holdout_style"),
        },
    }
    if info.get("shift") is not None:
        latent["shift"] = [float(v) for v in info["shift"]]
    return latent, parity
