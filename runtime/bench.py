"""``ddpm-rt bench``: per-step U-Net latency and end-to-end generation time on this machine.

Speed targets live here, not in timed tests: figures are medians of repeated runs, and
comparisons are made side by side within one run.
"""

from __future__ import annotations

import platform
import time

import numpy as np

from .pipeline import Generator


def _time(fn, repeats: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def run_bench(gen: Generator, batch_sizes=(1, 8, 16), repeats: int = 30) -> dict:
    c, h, w = gen.bundle.image_shape
    d = gen.bundle.context_dim
    rng = np.random.default_rng(0)
    rows = []
    t_mid = max(1, gen.schedule.timesteps // 2)
    for b in batch_sizes:
        x = rng.standard_normal((b, c, h, w), dtype=np.float32)
        ctx = np.zeros((b, d), dtype=np.float32)
        s = _time(lambda x=x, ctx=ctx: gen.eps(x, t_mid, ctx), repeats)
        rows.append(
            {
                "batch": b,
                "unet_ms_median": 1e3 * float(np.median(s)),
                "unet_ms_p90": 1e3 * float(np.percentile(s, 90)),
                "images_per_s_per_step": b / float(np.median(s)),
            }
        )
    ctx1 = np.zeros(d, dtype=np.float32)
    ends = {}
    for sampler, steps in (("ddim", min(50, gen.schedule.timesteps)), ("ddpm", None)):
        s = _time(
            lambda sampler=sampler, steps=steps: gen.generate(
                context=ctx1, sampler=sampler, steps=steps
            ),
            repeats=3,
            warmup=1,
        )
        ends[f"{sampler}{steps or gen.schedule.timesteps}_s"] = float(np.median(s))
    text = {}
    if gen.text is not None:
        from .text import tokenize

        ids, mask, _ = tokenize(
            gen.text.tokenizer, "a small red apple on a plain background", gen.text.max_tokens
        )
        for precision, graph in gen.bundle.conditioning["text"]["graphs"].items():
            feeds = {"input_ids": ids, "attention_mask": mask}
            s = _time(lambda graph=graph, feeds=feeds: gen.backend.run(graph, feeds), repeats)
            text[precision] = 1e3 * float(np.median(s))
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "providers": gen.backend.providers,
        "unet": rows,
        "generate_1_image": ends,
        "text_encoder_ms_per_prompt": text,
    }


def format_bench(r: dict) -> str:
    lines = [
        f"machine {r['machine']}, providers {','.join(r['providers'])}",
        "batch  unet ms (median)  p90     images/s per step",
    ]
    for row in r["unet"]:
        lines.append(
            f"{row['batch']:>5}  {row['unet_ms_median']:>16.2f}  "
            f"{row['unet_ms_p90']:>6.2f}  {row['images_per_s_per_step']:>10.0f}"
        )
    for k, v in r["generate_1_image"].items():
        lines.append(f"generate 1 image, {k[:-2]}: {v:.2f} s")
    for k, v in r.get("text_encoder_ms_per_prompt", {}).items():
        lines.append(f"text encoder {k}: {v:.2f} ms per prompt (10 tokens, uncached)")
    return "\n".join(lines)
