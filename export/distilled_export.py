"""A distilled U-Net (``ddpm-rt distill``, issue 29) in a bundle: what the manifest says of it,
and ``ddpm-rt export STUDENT --variant-of BUNDLE``, which adds it to an existing bundle as
the ``distilled`` precision-like variant (one bundle carries teacher and student; the text
encoder and decoder are shared).

The manifest's ``unet_precisions.<p>.distilled`` (docs/bundle-format.md): ``guidance``
({w_min, w_max}: the graph takes ``w`` and makes no unconditional pass; the bundle then
``requires`` ``guidance-distilled``), ``steps`` (the deterministic DDIM steps a
step-distilled student takes: sampler, eta 0, spacing, the integer timesteps) and
``prediction``; the entry's own ``recommended`` is what the runtime fills in when that U-Net
runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ddpm_rt.bundle.fileio import sha256_file
from ddpm_rt.bundle.io_spec import unet_io
from ddpm_rt.errors import InputError

from .tracing import ExportConfig, trace_to_onnx

VARIANT = "distilled"
GRAPH = "unet_distilled"
FILE = "unet.distilled.onnx"


def check_student_fits(bundle, model, meta: dict) -> None:
    """Refuse, before any work, a student that cannot stand in for the bundle's U-Net."""
    u = model.config
    if bundle.sample_shape != (u.in_channels, u.height, u.width):
        raise InputError(
            f"the student samples {(u.in_channels, u.height, u.width)}, the bundle's U-Net "
            f"{bundle.sample_shape}"
        )
    if u.context_dim != bundle.context_dim:
        raise InputError(
            f"the student's context is {u.context_dim}-d, the bundle's {bundle.context_dim}-d"
        )
    if meta["schedule"] != bundle.manifest["schedule"]:
        raise InputError("the student's noise schedule differs from the bundle's")
    if meta["conditioning"]["kind"] != bundle.conditioning["kind"]:
        raise InputError("the student is conditioned on another kind of input than the bundle")


def add_distilled_variant(
    cfg: ExportConfig, bundle_dir: str | Path, log: Callable[[str], None] = print
) -> dict:
    """Trace the distilled checkpoint ``cfg.checkpoint``, check it against torch, and add it
    to the bundle at ``bundle_dir`` as its ``distilled`` U-Net (validated first, written
    atomically; the bundle is left as it was when anything fails). Returns the entry."""
    import torch

    from ddpm_rt.training.model import fold_for_export, load_model

    from .onnx_export import check_unet_parity, distilled_facts, unet_parity_inputs
    from .variants import add_variant, open_for_variant

    ckpt = Path(cfg.checkpoint)
    model, meta = load_model(ckpt)
    facts = distilled_facts(meta)
    if facts is None:
        raise InputError(f"{ckpt} is not distilled (ddpm-rt distill makes one)")
    bundle, m = open_for_variant(bundle_dir, VARIANT, GRAPH, cfg.force, log, file=FILE)
    if bundle is None:
        return m["unet_precisions"][VARIANT]
    check_student_fits(bundle, model, meta)
    distilled, recommended = facts
    u = model.config
    spec = unet_io(u.in_channels, u.height, u.width, u.context_dim, u.guidance_embedding)
    feeds = unet_parity_inputs(model, 2, meta["conditioning"], meta.get("guidance"))
    example = tuple(torch.from_numpy(feeds[k]) for k in spec.input_names)
    data = trace_to_onnx(fold_for_export(model), example, spec, cfg.opset)
    parity = check_unet_parity(
        model, data, meta["conditioning"], cfg.parity_batches, meta.get("guidance")
    )
    for p in parity:
        log(
            f"parity distilled unet batch {p['batch']}: max |onnx - torch| = {p['max_abs_err']:.2e}"
        )
    entry = {
        "graph": GRAPH,
        "format": "fp32; distilled by ddpm-rt distill (issue 29)",
        "distilled": distilled,
        "recommended": recommended,
        "source": {
            "checkpoint_sha256": sha256_file(ckpt / "model.safetensors"),
            "step": meta.get("step"),
        },
        "parity": parity,
    }
    add_variant(bundle, m, VARIANT, FILE, data, entry, log)
    return entry
