"""``ddpm-rt bench`` rows for a distilled U-Net (issue 29): each distilled U-Net variant of
the bundle (:meth:`~ddpm_rt.bundle.bundle.Bundle.distillation`) beside today's default, end
to end.

A row is one call ``generate(prompt, num=b, batch_size=b)`` at the U-Net's own recommended
settings (:meth:`~ddpm_rt.bundle.bundle.Bundle.recommended_for`): prompt to uint8 images, the
text encoder run in every call (its embedding cache emptied first) and a latent bundle's
decode included, at each of the bench's batch sizes. The default and the variants are timed
round-robin, call for call, so that a slow or fast spell of a shared machine falls on all;
each figure is a median, ``vs_default`` the default's median time over the variant's (its
images/s over the default's). ``unet_rows_per_image``: U-Net image-evaluations per image --
the steps, doubled by guidance's unconditional pass, which a guidance-distilled U-Net does not
make.
"""

from __future__ import annotations

from ddpm_rt.config import GenerateConfig
from ddpm_rt.errors import DdpmRtError, first_line
from ddpm_rt.generator import Generator
from ddpm_rt.tools.bench_probe import time_round_robin


def _measures(gen: Generator) -> str:
    """What a row times, in words, for this bundle."""
    parts = ["prompt -> uint8 images in one call of num = batch"]
    if gen.text is not None:
        parts.append("the text encoder run each call")
    if gen.bundle.latent is not None:
        parts.append("decode included")
    return ", ".join(parts) + "; each U-Net at its own recommended settings, timed round-robin"


def distilled_precisions(gen: Generator) -> list[str]:
    """The bundle's distilled U-Net precisions, but the one ``gen`` runs."""
    b = gen.bundle
    return [
        p for p in b.unet_precisions if p != gen.unet_precision and b.distillation(p) is not None
    ]


def _settings(gen: Generator, cfg: GenerateConfig) -> dict:
    """What a run of ``gen`` at ``cfg`` uses, and its cost in U-Net rows per image."""
    resolved, sampler = cfg.resolve(gen.bundle, None, unet_precision=gen.unet_variant)
    return {
        "unet_precision": gen.unet_precision,
        "sampler": resolved.sampler,
        "steps": len(sampler.timesteps),
        "eta": resolved.eta,
        "guidance": resolved.guidance,
        "unet_rows_per_image": gen.unet_rows_per_image(cfg),
    }


def _call(gen: Generator, prompt: str, cfg: GenerateConfig, b: int):
    """Prompt -> ``b`` uint8 images in one call, the text encoder run again."""

    def run():
        if gen.text is not None:
            gen.text.clear_cache()
        gen.generate(prompt, config=cfg, num=b, batch_size=b)

    return run


def _variants(gen: Generator, default: GenerateConfig) -> tuple[dict, dict]:
    """({"default": (gen, default), precision: (its Generator, its settings)}, {precision:
    why it cannot run here})."""
    runs, skipped = {"default": (gen, default)}, {}
    for p in distilled_precisions(gen):
        try:
            g = Generator(
                gen.bundle,
                providers=gen.backend.providers,
                unet_precision=p,
                threads=gen.backend.threads,
            )
        except DdpmRtError as e:  # a variant this backend cannot load
            skipped[p] = first_line(e)
            continue
        runs[p] = (g, GenerateConfig())  # None everywhere: the variant's own recommended
    return runs, skipped


def distilled_end_to_end(
    gen: Generator, default: GenerateConfig, prompt: str, batch_sizes, repeats: int
) -> dict | None:
    """``end_to_end_distilled``: ``rows`` ("default" and each distilled precision: settings,
    ``unet_rows_per_image``, per batch size seconds per call, images/s and ``vs_default``)
    and ``vs_default`` ({precision: {"batch_B": ratio}}); None without a distilled U-Net."""
    runs, skipped = _variants(gen, default)
    if len(runs) == 1 and not skipped:
        return None
    rows = {name: {**_settings(g, cfg), "batches": []} for name, (g, cfg) in runs.items()}
    for b in batch_sizes:
        calls = [_call(g, prompt, cfg, b) for g, cfg in runs.values()]
        medians = time_round_robin(calls, repeats)
        for row, sec in zip(rows.values(), medians, strict=True):
            figures = {"batch": b, "seconds": sec, "images_per_s": b / sec}
            if row is not rows["default"]:
                figures["vs_default"] = medians[0] / sec
            row["batches"].append(figures)
    ratios = {
        name: {f"batch_{f['batch']}": f["vs_default"] for f in row["batches"]}
        for name, row in rows.items()
        if name != "default"
    }
    rows.update({p: {"skipped": why} for p, why in skipped.items()})
    return {"measures": _measures(gen), "rows": rows, "vs_default": ratios}
