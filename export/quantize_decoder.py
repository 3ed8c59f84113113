"""A latent bundle's decoder in fp16 or int8, checked against its fp32 decoder.

``ddpm-rt quantize BUNDLE --graph decoder --precision fp16|int8``. The reference inputs are
the latents the decoder is given in use: the bundle's own U-Net samples trajectories at its
recommended settings for the calibration prompts, and every predicted x̂0 along them (what a
step preview decodes) and each final x_0 (the image) is recorded
(:func:`ddpm_rt.parity.record_latents`). The variant's pixels are compared with the
fp32 decoder's on them by :func:`ddpm_rt.parity.compare` with the tolerance table's
``("ort", "decoder-<precision>")`` entry (pixel error in grey levels); a variant that misses
is refused and nothing is written. int8 is the same static QOperator u8/s8 format as the
CPU int8 U-Net, calibrated on three batches in four and checked on the fourth: it is added
only where it holds its tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddpm_rt.backends import cpu_kernels
from ddpm_rt.errors import InputError
from ddpm_rt.generator import Generator
from ddpm_rt.parity import compare, record_latents
from ddpm_rt.tolerances import TOLERANCES

from .quantize import FP16_FORMAT, INT8_FORMAT, calibration_contexts
from .variants import (
    QuantizeError,
    add_variant,
    fp16_graph,
    open_for_variant,
    static_int8,
)

DECODER_VARIANTS = {  # precision -> (graph name, file)
    "fp16": ("decoder_fp16", "decoder.fp16.onnx"),
    "int8": ("decoder_int8", "decoder.int8.onnx"),
}


def decoder_variant(
    bundle_dir: str | Path,
    precision: str,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Add an fp16 or int8 decoder to a latent bundle (rewrites its manifest: the digest
    changes); returns its manifest entry (``latent.decoder.variants.<precision>``)."""
    if precision not in DECODER_VARIANTS:
        raise InputError(
            f"a decoder variant is one of {', '.join(DECODER_VARIANTS)}, not {precision!r:.20}"
        )
    graph, file = DECODER_VARIANTS[precision]
    bundle, m = open_for_variant(
        bundle_dir, precision, graph, force, log, what="decoder", file=file
    )
    if bundle is None:
        return m["latent"]["decoder"].get("variants", {}).get(precision, {"graph": graph})
    if bundle.latent is None:
        raise InputError(f"{bundle.path} is a pixel bundle: it has no decoder to convert")
    if "fp32" not in bundle.decoder_precisions:
        raise InputError(f"{bundle.path} has no fp32 decoder to check a {precision} one against")
    gen = Generator(bundle, decoder_precision="fp32")
    prompts, contexts = calibration_contexts(gen, limit=32 if precision == "int8" else 16)
    latents = record_latents(gen, contexts)
    if not all(np.isfinite(a).all() for a in latents):
        raise QuantizeError(
            "the bundle's U-Net gives non-finite latents along its own trajectories: no "
            f"{precision} decoder can be checked on them (the bundle is unchanged)"
        )
    feeds = [{"latent": a} for a in latents]
    if precision == "int8":
        calib = [f for k, f in enumerate(feeds) if k % 4 != 3]
        feeds = [f for k, f in enumerate(feeds) if k % 4 == 3]
        log(
            f"calibrating on {len(calib)} batches of latents ({len(prompts)} prompts); "
            f"{len(feeds)} held out"
        )
        data, fmt = static_int8(bundle.graph_bytes(gen.decoder_graph), calib), INT8_FORMAT
    else:
        data, fmt = fp16_graph(bundle.graph_bytes(gen.decoder_graph)), FP16_FORMAT
    figures = _check_decoder(gen, precision, data, feeds, log)
    entry = {
        "graph": graph,
        "format": fmt,
        "checks": {"batches": len(feeds), "prompts": len(prompts), **figures},
    }
    add_variant(bundle, m, precision, file, data, entry, log, decoder=True)
    return entry


def _check_decoder(gen: Generator, precision: str, data: bytes, feeds: list[dict], log) -> dict:
    """The variant's pixels against the fp32 decoder's on ``feeds``, by the tolerance table's
    ``("ort", "decoder-<precision>")``; its figures, or :class:`QuantizeError` when it misses."""
    import onnxruntime as ort

    ref = [gen.backend.run(gen.decoder_graph, f)["image"] for f in feeds]
    if not all(np.isfinite(r).all() for r in ref):
        raise QuantizeError(
            f"the bundle's fp32 decoder is not finite on its own latents: no {precision} "
            "decoder can be checked against it (the bundle is unchanged)"
        )
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = [sess.run(["image"], f)[0] for f in feeds]
    key = ("ort", f"decoder-{precision}")
    ok, figures = compare(key, got, ref)
    log(
        f"{precision} vs fp32 decoder on {sum(len(f['latent']) for f in feeds)} recorded "
        "latents: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
    )
    if not ok:
        raise QuantizeError(
            f"{precision} decoder misses its parity check {TOLERANCES[key]}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
            + " (nothing was written; the bundle is unchanged)"
        )
    return {**figures, "cpu_family": cpu_kernels.family()}
