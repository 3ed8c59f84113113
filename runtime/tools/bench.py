"""``ddpm-rt bench``: ddpm-rt against the PyTorch way, side by side in one run.

Speed targets live here, not in timed tests: every figure is a median of repeated runs on
this machine, and comparisons are ratios measured in the same run. Sections:

1. the machine's fp32 peak, from a large ONNX Runtime MatMul (NumPy's BLAS reads far lower);
2. the U-Net's FLOPs per image-step, counted from the graph;
3. per-step latency and images/s at each batch size for torch eager, torch.compile (same
   weights, parity-checked first), ddpm-rt fp32 and int8, with the fraction of the peak;
4. end to end, one image at batch 1: the course's torch DDPM-500 loop vs ddpm-rt at its
   default and at every sampler/step row of the evaluation grid; with a distilled U-Net in
   the bundle, it beside the default at each batch size, prompt to images
   (:mod:`ddpm_rt.tools.bench_distilled`);
5. the sampler's own overhead per step (everything but the U-Net call);
6. cold start (process start -> PNG on disk) and peak RSS of ``ddpm-rt --prompt`` at the
   defaults vs a torch script doing the same with the same weights; torch never imported.

A latent bundle's end-to-end and cold-start figures include loading and running its decoder;
its decoder is also timed alone, and ``--compare`` adds end-to-end rows for both bundles
(:mod:`ddpm_rt.tools.bench_latent`).

Rows that need torch (``train`` extra) or onnx (``export`` extra) are skipped with the
reason when those are missing. The torch code lives in ddpm_rt.training.torch_reference,
imported lazily for those rows only: the runtime itself never imports torch.
"""

from __future__ import annotations

import os
import platform
from dataclasses import replace

import numpy as np
import onnxruntime as ort

from ddpm_rt.config import GenerateConfig
from ddpm_rt.core.samplers import EVAL_GRID
from ddpm_rt.errors import InputError, first_line
from ddpm_rt.extras import optional
from ddpm_rt.generator import Generator
from ddpm_rt.tools.bench_distilled import distilled_end_to_end
from ddpm_rt.tools.bench_latent import compare_end_to_end, decode_rows
from ddpm_rt.tools.bench_probe import (
    cold_start,
    cpu_name,
    peak_gflops,
    time_it,
    time_round_robin,
    unet_flops,
)
from ddpm_rt.tools.bench_report import format_bench  # noqa: F401 - the CLI imports it from here

PROMPT = "red apple"


def _prompt(gen: Generator) -> str:
    """What to ask for: "red apple" for a text bundle, else its first label (or nothing)."""
    if gen.text is not None:
        return PROMPT
    return (gen.bundle.label_names or [""])[0]


def _torch_model(gen: Generator, checkpoint):
    """(torch module, torch_reference module, None) or (None, None, why not)."""
    if (gen.bundle.distillation("fp32") or {}).get("guidance"):
        return None, None, "a guidance-distilled U-Net: the torch reference feeds no w"
    torch, why = optional("torch", "train")
    if torch is None:
        return None, None, why
    ref, why = optional("ddpm_rt.training.torch_reference", "train,export")
    if ref is None:
        return None, None, why
    try:
        return ref.model_from_bundle(gen.bundle.path, checkpoint), ref, None
    except Exception as e:  # a bundle without a recorded config, unmapped weights
        return None, None, f"cannot rebuild the torch U-Net: {e}"


def _torch_rows(gen: Generator, batch_sizes, repeats, torch_model, compile_: bool, flops, peak):
    """Per-step rows for torch eager and torch.compile, after a parity check against ddpm-rt
    fp32 (the torch code itself lives in ddpm_rt.training.torch_reference)."""
    from ddpm_rt.tolerances import check

    model, ref, _ = torch_model
    c, h, w = gen.bundle.sample_shape
    d = gen.bundle.context_dim
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, c, h, w), dtype=np.float32)
    ctx = rng.standard_normal((8, d)).astype(np.float32)
    ctx /= np.linalg.norm(ctx, axis=1, keepdims=True)
    t = max(1, gen.schedule.timesteps // 2)
    want = ref.eps(model, x, t / gen.schedule.timesteps, ctx)
    ok, excess = check("ort", "fp32", gen.eps(x, t, ctx), want)
    if not ok:
        return {"skipped": f"torch and ONNX Runtime disagree (excess {excess:.2e}): refused"}
    rows = {"parity": "torch vs ddpm-rt fp32 within the tolerance table"}
    variants = {"torch eager": model}
    if not compile_:
        rows["torch.compile"] = {"skipped": "not asked for (--no-compile)"}
    else:
        try:
            variants["torch.compile"] = ref.compiled(model)
        except Exception as e:
            rows["torch.compile"] = {"skipped": f"torch.compile unavailable: {e}"}
    for name, net in variants.items():
        out = []
        for b in batch_sizes:
            xb = rng.standard_normal((b, c, h, w), dtype=np.float32)
            run = ref.runner(net, xb, 0.5, np.repeat(ctx[:1], b, axis=0))
            try:
                s = time_it(run, repeats, warmup=5)
            except Exception as e:  # torch.compile needs a C++ toolchain at first call
                out = {"skipped": f"{name} failed: {first_line(e)[:120]}"}
                break
            out.append(_row(b, s, flops, peak))
        rows[name] = out
    return rows


def _row(b: int, s: np.ndarray, flops, peak, fp32: bool = True) -> dict:
    med = float(np.median(s))
    row = {
        "batch": b,
        "ms_per_step": 1e3 * med,
        "p90_ms": 1e3 * float(np.percentile(s, 90)),
        "images_per_s_per_step": b / med,
    }
    if flops and peak and fp32:  # an int8 graph is not bound by the fp32 peak
        row["fraction_of_peak"] = flops * b / med / 1e9 / peak
    return row


def _ort_rows(gen: Generator, batch_sizes, repeats, flops, peak) -> list[dict]:
    fp32 = gen.unet_precision == "fp32"
    c, h, w = gen.bundle.sample_shape
    rng = np.random.default_rng(0)
    ctx1 = gen.context(_prompt(gen))
    out = []
    t = max(1, gen.schedule.timesteps // 2)
    for b in batch_sizes:
        x = rng.standard_normal((b, c, h, w), dtype=np.float32)
        ctx = np.repeat(ctx1[None].astype(np.float32), b, axis=0)
        s = time_it(lambda x=x, ctx=ctx: gen.eps(x, t, ctx), repeats)
        out.append(_row(b, s, flops, peak, fp32))
    return out


def _end_to_end(gen: Generator, default: GenerateConfig, torch_model, repeats: int) -> dict:
    ctx = gen.context(_prompt(gen))
    rows = {}
    settings = [("default", default)]
    for name, steps, eta in EVAL_GRID:
        if steps is None or steps <= gen.schedule.timesteps:
            settings.append(
                (
                    f"{name}-{steps or gen.schedule.timesteps}"
                    + (f" eta {eta:g}" if eta is not None else ""),
                    GenerateConfig(sampler=name, steps=steps, eta=eta),
                )
            )
    for label, cfg in settings:
        s = time_it(lambda cfg=cfg: gen.generate(context=ctx, config=cfg), repeats, warmup=1)
        rows[label] = {"seconds": float(np.median(s)), "images_per_s": 1 / float(np.median(s))}
    rows.update(_from_image(gen, ctx, default, repeats))
    model, ref, why = torch_model
    if gen.bundle.latent is not None:
        why = "a latent bundle: the course's loop has no decoder (its rows would not compare)"
    if model is None or gen.bundle.latent is not None:
        rows["torch course DDPM"] = {"skipped": why}
        return rows
    c = ctx[None].astype(np.float32)
    s = time_it(lambda: ref.course_ddpm(model, c, gen.schedule), max(1, repeats), warmup=1)
    base = float(np.median(s))
    rows[f"torch course DDPM-{gen.schedule.timesteps}"] = {
        "seconds": base,
        "images_per_s": 1 / base,
    }
    for r in rows.values():
        if "seconds" in r:  # not a skipped row
            r["vs_torch_course"] = base / r["seconds"]
    return rows


IMG2IMG_STRENGTHS = (0.3, 0.5, 0.7)


def _from_image(gen: Generator, ctx, default: GenerateConfig, repeats: int) -> dict:
    """Image-to-image at the default settings from the default's own picture, per strength:
    the run takes the last int(strength x steps) steps, so about strength x the time of
    text-to-image, plus reading the picture and the steps' fixed costs (the decoder's):
    ``vs_text_to_image``, the ratio of the medians, text-to-image timed alternately with it."""
    picture = gen.generate(context=ctx, config=default)[0]
    rows = {}
    for strength in IMG2IMG_STRENGTHS:
        label = f"default img2img {strength:g}"
        cfg = replace(default, strength=strength)
        try:
            gen.prepare(context=ctx, config=cfg, init_image=picture)
        except InputError as e:  # a latent bundle without an encoder
            rows[label] = {"skipped": str(e)}
            continue
        # text-to-image timed again call for call beside it: a busy spell falls on both
        calls = (
            lambda cfg=cfg: gen.generate(context=ctx, config=cfg, init_image=picture),
            lambda: gen.generate(context=ctx, config=default),
        )
        sec, t2i = time_round_robin(calls, repeats)
        rows[label] = {"seconds": sec, "images_per_s": 1 / sec, "vs_text_to_image": sec / t2i}
    return rows


def _overhead(gen: Generator, cfg: GenerateConfig, repeats: int) -> dict:
    """Per step at batch 1: the whole step vs the U-Net call alone."""
    ctx = gen.context(_prompt(gen))

    cfg = cfg.with_defaults(gen.bundle.recommended)
    n = len(cfg.make_sampler(gen.schedule).timesteps)
    total = float(np.median(time_it(lambda: gen.generate(context=ctx, config=cfg), repeats, 2))) / n
    c, h, w = gen.bundle.sample_shape
    x = np.zeros((1, c, h, w), np.float32)
    c1 = ctx[None].astype(np.float32)
    unet = float(np.median(time_it(lambda: gen.eps(x, 1, c1, cfg.guidance), 5 * repeats)))
    return {
        "setting": f"{cfg.sampler}-{n} guidance {cfg.guidance:g}",
        "step_ms": 1e3 * total,
        "unet_ms": 1e3 * unet,
        "overhead_fraction": max(0.0, 1 - unet / total),
    }


def _one_step_feeds(gen: Generator) -> dict:
    """One input of the fp32 U-Net graph at batch 1, for counting its FLOPs (w too when the
    graph takes it: a distilled model's own bundle)."""
    c, h, w = gen.bundle.sample_shape
    feeds = {
        "x": np.zeros((1, c, h, w), np.float32),
        "t": np.full((1, 1), 0.5, np.float32),
        "c": gen.context(_prompt(gen))[None].astype(np.float32),
    }
    if (gen.bundle.distillation("fp32") or {}).get("guidance"):
        feeds["w"] = np.full((1, 1), 2.0, np.float32)
    return feeds


def _header(gen: Generator, default: GenerateConfig, peak, peak_why, flops, flops_why) -> dict:
    """The report's first keys: the machine, the bundle and its default settings."""
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "providers": gen.backend.providers,
        "bundle_digest": gen.bundle.digest,
        "prompt": _prompt(gen),
        "peak_gflops": peak if peak else {"skipped": peak_why},
        "unet_flops_per_image_step": flops if flops else {"skipped": flops_why},
        "default": {
            "sampler": default.sampler,
            "steps": len(default.make_sampler(gen.schedule).timesteps),
            "guidance": default.guidance,
            "unet_precision": gen.unet_precision,
            "decoder_precision": gen.decoder_precision,  # None: a pixel bundle
        },
    }


def _unet_section(
    gen: Generator,
    other: Generator | None,
    compare: str | None,
    batch_sizes,
    repeats: int,
    torch_model,
    compile_torch: bool,
    flops,
    peak,
) -> dict:
    """``unet_cost_vs_compare`` (with a compared bundle), ``unet_per_step`` (every precision
    of the bundle, the compared bundle's fp32, torch) and ``decode_per_image``."""
    out = {}
    rows = {}
    for precision in gen.bundle.unet_precisions:
        g = (
            gen
            if precision == gen.unet_precision
            else Generator(
                gen.bundle,
                providers=gen.backend.providers,
                unet_precision=precision,
                threads=gen.backend.threads,
            )
        )
        rows[f"ddpm-rt {precision}"] = _ort_rows(g, batch_sizes, repeats, flops, peak)
    if other is not None:
        rows["compare fp32"] = _ort_rows(other, batch_sizes, repeats, None, None)
        # this bundle timed again after the other, and the two averaged: a slow or fast
        # spell of a shared machine falls on both sides
        again = _ort_rows(gen, batch_sizes, repeats, None, None)
        out["unet_cost_vs_compare"] = {
            "bundle": str(compare),  # as the user named it: reports stay repo-relative
            **{
                f"batch_{a['batch']}": (a["ms_per_step"] + c["ms_per_step"]) / 2 / b["ms_per_step"]
                for a, b, c in zip(rows["ddpm-rt fp32"], rows["compare fp32"], again, strict=True)
            },
        }
    if torch_model[0] is None:
        rows["torch"] = {"skipped": torch_model[2]}
    else:
        rows.update(_torch_rows(gen, batch_sizes, repeats, torch_model, compile_torch, flops, peak))
    out["unet_per_step"] = rows
    decode = decode_rows(gen, batch_sizes, repeats)
    if other is not None:
        decode.update(
            {f"compare {k}": v for k, v in decode_rows(other, batch_sizes, repeats).items()}
        )
    if decode:
        out["decode_per_image"] = decode
    return out


def _e2e_section(
    gen: Generator,
    other: Generator | None,
    compare: str | None,
    default,
    torch_model,
    repeats,
    batch_sizes,
) -> dict:
    """``end_to_end_1_image``, ``end_to_end_distilled`` when the bundle has a distilled
    U-Net (at each of ``batch_sizes``, :mod:`~ddpm_rt.tools.bench_distilled`), and
    ``end_to_end_vs_compare`` with a compared bundle."""
    out = {"end_to_end_1_image": _end_to_end(gen, default, torch_model, max(3, repeats // 10))}
    distilled = distilled_end_to_end(gen, default, _prompt(gen), batch_sizes, max(3, repeats // 10))
    if distilled is not None:
        out["end_to_end_distilled"] = distilled
    if other is not None:
        out["end_to_end_vs_compare"] = {
            "bundle": str(compare),  # as the user named it
            **compare_end_to_end(gen, other, (_prompt(gen), _prompt(other)), max(3, repeats // 10)),
        }
    return out


def _text_encoder_ms(gen: Generator, repeats: int) -> dict:
    """Each text-encoder graph's median ms for one prompt."""
    from ddpm_rt.text import tokenize

    ids, mask, _ = tokenize(
        gen.text.tokenizer, "a small red apple on a plain background", gen.text.max_tokens
    )
    text = {}
    for precision, graph in gen.bundle.conditioning["text"]["graphs"].items():
        feeds = {"input_ids": ids, "attention_mask": mask}
        s = time_it(lambda graph=graph, feeds=feeds: gen.backend.run(graph, feeds), repeats)
        text[precision] = 1e3 * float(np.median(s))
    return text


def run_bench(
    gen: Generator,
    batch_sizes=(1, 8, 32),
    repeats: int = 30,
    checkpoint: str | None = None,
    sections: tuple[str, ...] = ("unet", "e2e", "overhead", "cold", "text"),
    compile_torch: bool = True,
    compare: str | None = None,
) -> dict:
    """``compare``: another bundle (pixel or latent) timed in the same run: its fp32 U-Net
    (rows ``compare fp32``; ``unet_cost_vs_compare`` gives this fp32 U-Net's per-step time
    over that one's at each batch size) and, with ``e2e``, both end to end per image
    (``end_to_end_vs_compare``, :func:`~ddpm_rt.tools.bench_latent.compare_end_to_end`)."""
    default = GenerateConfig().with_defaults(gen.bundle.recommended)
    torch_model = (
        _torch_model(gen, checkpoint)
        if {"unet", "e2e", "cold"} & set(sections)
        else (None, None, "not measured")
    )
    peak, peak_why = peak_gflops(gen.backend.threads)
    one = _one_step_feeds(gen)
    flops, flops_why = unet_flops(gen.bundle.graph_bytes("unet"), one)
    result = _header(gen, default, peak, peak_why, flops, flops_why)
    other = (
        None
        if compare is None
        else Generator(compare, providers=gen.backend.providers, threads=gen.backend.threads)
    )
    if "unet" in sections:
        result.update(
            _unet_section(
                gen, other, compare, batch_sizes, repeats, torch_model, compile_torch, flops, peak
            )
        )
    if "e2e" in sections:
        result.update(_e2e_section(gen, other, compare, default, torch_model, repeats, batch_sizes))
    if "overhead" in sections:
        # the default run (per-call setup amortised over its few steps) and the seed's
        # DDPM-500 (the per-step cost alone)
        result["sampler_overhead"] = [
            _overhead(gen, default, max(5, repeats // 3)),
            _overhead(gen, GenerateConfig(sampler="ddpm"), 3),
        ]
    if "cold" in sections:
        torch_why = torch_model[2]
        if gen.bundle.latent is not None:
            torch_why = "a latent bundle: the torch script has no decoder"
        result["cold_start"] = cold_start(gen, _prompt(gen), default, 3, torch_why)
    if "text" in sections and gen.text is not None:
        result["text_encoder_ms_per_prompt"] = _text_encoder_ms(gen, repeats)
    return result
