"""Inputs recorded along real trajectories, and how a graph variant is compared with fp32.

Shared by ``ddpm-rt quantize`` (checking a new precision variant on this CPU) and
``ddpm-rt doctor`` (checking every backend and precision a machine offers), so both judge a
graph the same way: by the tolerance table (:mod:`ddpm_rt.tolerances`). It sits in the
generator's layer, below ``tools/``: the exporters (``export/quantize*.py``) import it, and
nothing outside ``runtime/`` imports a runtime tool.
"""

from __future__ import annotations

import numpy as np

from ddpm_rt.config import GenerateConfig
from ddpm_rt.core.noise import ImageNoise
from ddpm_rt.core.samplers import make_sampler, sample_loop
from ddpm_rt.core.schedule import predict_x0, timestep_input
from ddpm_rt.tolerances import check, tolerance


def record(gen, contexts: np.ndarray, every: int, batch: int = 16) -> list[dict]:
    """(x_t, t/T, c) feeds from DDPM trajectories of ``gen`` (its fp32 U-Net on its backend),
    at every ``every``-th timestep (and t=1)."""
    T = gen.schedule.timesteps
    feeds = []
    for start in range(0, len(contexts), batch):
        c = contexts[start : start + batch]

        def eps_fn(x, t, c=c):
            if t % every == 0 or t == 1:
                tt = np.full((len(x), 1), timestep_input(t, T), dtype=np.float32)
                feeds.append({"x": x.copy(), "t": tt, "c": c})
            return gen.eps(x, t, c)

        noise = ImageNoise(start, range(len(c)))
        sample_loop(
            eps_fn, make_sampler("ddpm", gen.schedule), (len(c), *gen.bundle.sample_shape), noise
        )
    return feeds


def record_distilled(gen, contexts: np.ndarray, batch: int = 8, min_rows: int = 32) -> list[dict]:
    """(x_t, t/T, c[, w]) feeds along the trajectories a distilled U-Net (``gen``'s) runs in
    use: its own recommended sampler and steps (a step-distilled graph is only ever evaluated
    at its distilled timesteps, so DDPM's T steps would calibrate it on inputs it never
    sees), at guidance ``w_min``, the recommended scale and ``w_max`` of a guidance-distilled
    graph (``w`` fed). A 2-step student gives 2 feeds per batch of trajectories, not ~40, so
    the prompts are repeated (each repeat another image of the seed) until every scale has
    ``min_rows`` trajectories: enough batches to calibrate on and to hold out."""
    rec = gen.bundle.recommended_for(gen.unet_variant)
    scales = [GenerateConfig().with_defaults(rec).guidance]
    if gen.unet_takes_w:
        w = gen.distilled["guidance"]
        scales = sorted({w["w_min"], *scales, w["w_max"]})
    reps = -(-min_rows // len(contexts))  # ceil
    rows = np.concatenate([contexts] * reps)
    T, feeds = gen.schedule.timesteps, []
    for k, scale in enumerate(scales):
        _, sampler = GenerateConfig(guidance=scale).resolve(
            gen.bundle, unet_precision=gen.unet_variant
        )  # the sampler a request at this scale runs
        for start in range(0, len(rows), batch):
            c = rows[start : start + batch]

            def eps_fn(x, t, c=c, scale=scale):
                feed = {"x": x.copy(), "t": np.full((len(x), 1), timestep_input(t, T)), "c": c}
                if gen.unet_takes_w:
                    feed["w"] = np.full((len(x), 1), scale)
                feeds.append({name: np.asarray(v, np.float32) for name, v in feed.items()})
                return gen.eps(x, t, c, scale)

            noise = ImageNoise(k, range(start, start + len(c)))
            sample_loop(eps_fn, sampler, (len(c), *gen.bundle.sample_shape), noise)
    return feeds


def record_in_use(gen, contexts: np.ndarray, every: int, batch: int = 16) -> list[dict]:
    """The feeds ``gen``'s U-Net is checked and calibrated on: along DDPM trajectories
    (:func:`record`) for an ordinary U-Net, along its own few steps for a distilled one
    (:func:`record_distilled`)."""
    if gen.distilled:
        return record_distilled(gen, contexts, batch=min(batch, 8))
    return record(gen, contexts, every, batch)


def record_latents(gen, contexts: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """What a latent bundle's decoder is given in use, batch by batch (each (B, C, h, w)):
    trajectories of ``gen``'s U-Net at the bundle's recommended settings (sampler, steps,
    guidance), recording the predicted x̂0 at every step (what step previews decode) and
    each trajectory's final x_0 (the image)."""
    cfg = GenerateConfig().with_defaults(gen.bundle.recommended)
    x_coef, eps_coef = gen.schedule.x0_coefficients(np.arange(gen.schedule.timesteps + 1))
    latents = []
    for start in range(0, len(contexts), batch):
        c = contexts[start : start + batch]

        def eps_fn(x, t, c=c):
            eps = gen.eps(x, t, c, cfg.guidance)
            latents.append(predict_x0(x, eps, x_coef[t], eps_coef[t]).astype(np.float32))
            return eps

        noise = ImageNoise(start, range(len(c)))
        sampler = cfg.make_sampler(gen.schedule)
        latents.append(sample_loop(eps_fn, sampler, (len(c), *gen.bundle.sample_shape), noise))
    return latents


def compare(
    key: tuple[str, str],
    got: list[np.ndarray],
    ref: list[np.ndarray],
    timesteps: np.ndarray | None = None,
    T: int | None = None,
) -> tuple[bool, dict]:
    """Judge a variant's outputs (``got``: eps, or a decoder's pixels) against fp32's
    (``ref``), batch by batch, by the tolerance table's entry ``key`` = (backend,
    precision); returns (passes, figures). ``timesteps`` and ``T`` (the batch rows'
    timesteps) are needed by the cosine entries only."""
    tol = tolerance(*key)
    g = np.concatenate([a.reshape(len(a), -1) for a in got]).astype(np.float64)
    r = np.concatenate([a.reshape(len(a), -1) for a in ref]).astype(np.float64)
    if not np.isfinite(g).all():
        return False, {"non_finite": int((~np.isfinite(g)).sum())}
    if "max_grey_levels" in tol:
        # pixels in [-1, 1]; what leaves the range is clipped when the image is written,
        # so only the error inside it shows: in grey levels (one is 2/255)
        err = np.abs(np.clip(g, -1, 1) - np.clip(r, -1, 1)) * 127.5
        figures = {
            "max_grey_levels": float(err.max()),
            "mean_grey_levels": float(err.mean()),
        }
        ok = figures["max_grey_levels"] <= tol["max_grey_levels"] and (
            figures["mean_grey_levels"] <= tol["mean_grey_levels"]
        )
        return ok, figures
    if "min_mean_cosine" in tol:
        cos = (g * r).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1))
        late = timesteps > T // 10
        figures = {
            "mean_cosine": float(cos.mean()),
            "min_cosine_t_over_T_10": float(cos[late].min()),
        }
        ok = figures["mean_cosine"] >= tol["min_mean_cosine"] and (
            figures["min_cosine_t_over_T_10"] >= tol["min_cosine_late"]
        )
        return ok, figures
    if "max_rel_l2" in tol:
        rel = np.linalg.norm(g - r, axis=1) / np.linalg.norm(r, axis=1)
        return bool(rel.max() <= tol["max_rel_l2"]), {"max_rel_l2": float(rel.max())}
    ok, excess = check(key[0], key[1], g, r)
    return ok, {"max_excess": excess}
