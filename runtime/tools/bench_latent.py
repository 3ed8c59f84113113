"""``ddpm-rt bench`` rows for latent bundles (issue 19) and for two bundles in one run.

- the decoder alone, per image at each batch size and decoder precision (a pixel bundle has
  none: its rows are absent);
- ``--compare``: end-to-end time per image (prompt -> uint8 pixels, the decode included) of
  this bundle and the other at batch 1 and 8, at one common setting (DDIM-8, guidance 2) and
  at each bundle's own recommended settings, timed alternately so that a slow or fast spell
  of a shared machine falls on both; the ratio is this bundle's time over the other's (and,
  when one is latent and the other pixel, ``latent_over_pixel``: the latent one's over the
  pixel one's, whichever was named first).
"""

from __future__ import annotations

import numpy as np

from ddpm_rt.config import GenerateConfig
from ddpm_rt.generator import Generator
from ddpm_rt.tools.bench_probe import time_it, time_round_robin

COMMON = ("ddim-8 guidance 2", GenerateConfig(sampler="ddim", steps=8, guidance=2.0))
COMPARE_BATCHES = (1, 8)


def decode_rows(gen: Generator, batch_sizes, repeats: int) -> dict[str, list[dict]]:
    """{"decoder <precision>": rows}: the decoder graph alone on latents of the U-Net's
    shape, each row the median ms per call and per image."""
    rng = np.random.default_rng(0)
    rows = {}
    for precision, graph in gen.bundle.decoder_precisions.items():
        out = []
        for b in batch_sizes:
            z = rng.standard_normal((b, *gen.bundle.sample_shape), dtype=np.float32)
            s = time_it(lambda z=z, g=graph: gen.backend.run(g, {"latent": z}), repeats)
            med = float(np.median(s))
            out.append({"batch": b, "ms_per_call": 1e3 * med, "ms_per_image": 1e3 * med / b})
        rows[f"decoder {precision}"] = out
    return rows


def _kind(gen: Generator) -> str:
    return "latent" if gen.bundle.latent else "pixel"


def _settings(gen: Generator) -> dict:
    cfg = GenerateConfig().with_defaults(gen.bundle.recommended).resolved(gen.schedule)
    return {"sampler": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance}


def compare_end_to_end(gen: Generator, other: Generator, prompts: tuple, repeats: int) -> dict:
    """Seconds per image end to end for ``gen`` and ``other`` (``prompts``: what each is
    asked for), and ``gen``'s time over ``other``'s, per setting and batch size."""
    result = {
        "this": {"kind": _kind(gen), "recommended": _settings(gen)},
        "other": {"kind": _kind(other), "recommended": _settings(other)},
        "rows": [],
    }
    mixed = (gen.bundle.latent is None) != (other.bundle.latent is None)
    ctxs = [g.context(p) for g, p in zip((gen, other), prompts, strict=True)]
    for label, cfg in (COMMON, ("recommended", GenerateConfig())):
        for b in COMPARE_BATCHES:
            run = [
                lambda g=g, c=c, cfg=cfg, b=b: g.generate(
                    context=c, config=cfg, num=b, batch_size=b
                )
                for g, c in zip((gen, other), ctxs, strict=True)
            ]
            this, that = (s / b for s in time_round_robin(run, repeats))
            row = {
                "setting": label,
                "batch": b,
                "this_s_per_image": this,
                "other_s_per_image": that,
                "ratio": this / that,
            }
            if mixed:  # the question: what the latent bundle costs per pixel one
                row["latent_over_pixel"] = this / that if gen.bundle.latent else that / this
            result["rows"].append(row)
    return result
