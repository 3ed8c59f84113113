"""Per run, per row: a request resolved to rows (:class:`Job`), and one sampling loop over the
rows of one or more requests (:class:`Run`).

A job's rows carry everything that is theirs: context, seed and image index (so its own
noise stream, :mod:`ddpm_rt.core.noise`), guidance scale and unconditional context, step
callback. Jobs that share a sampler's settings (:attr:`Job.batch_key`) can run as one batch:
every step is one U-Net call over all their rows, and each row's arithmetic is its own, so an
image is the same whether its request ran alone or beside others. A job that is cancelled or
whose rows turn non-finite ends with its own error; the other rows go on without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ddpm_rt.config import GenerateConfig
from ddpm_rt.core.guidance import GuidedUNet
from ddpm_rt.core.noise import ImageNoise
from ddpm_rt.core.samplers import Sampler, sample_loop
from ddpm_rt.core.schedule import predict_x0, timestep_input
from ddpm_rt.errors import Cancelled, InputError, NumericalError
from ddpm_rt.progress import StepInfo
from ddpm_rt.tolerances import STEP_ABS_MAX


@dataclass(eq=False)
class Job:
    """One request, checked and resolved to rows; made by :meth:`Generator.prepare`.

    After :meth:`Generator.run_jobs` either ``images`` (N, H, W, 3) uint8 is set or ``error``
    (what ended it: :class:`Cancelled`, :class:`NumericalError`, or the callback's exception).
    """

    config: GenerateConfig  # as resolved: steps, eta and spacing filled in
    sampler: Sampler  # the run's template; each run steps a fresh copy
    contexts: np.ndarray  # (N, D) float32, one row per image
    image_index: np.ndarray  # (N,) the image's index i in its seed's streams
    negative: np.ndarray | None = None  # (D,) unconditional context (negative prompt)
    prompts: list[str] | None = None  # as asked (None: a raw context), for provenance
    negative_prompt: str | None = None
    callback: Callable[[StepInfo], bool | None] | None = None
    preview_every: int = 0
    # Image-to-image and inpainting (Generator.prepare makes them from the request's inputs):
    # the init image in the U-Net's space (C, h, w) and in the output's (H, W, 3) uint8; the
    # mask (True = repaint) in both, (1, h, w) and (H, W, 1); the step the run starts at.
    init: np.ndarray | None = None
    init_pixels: np.ndarray | None = None
    mask: np.ndarray | None = None
    mask_pixels: np.ndarray | None = None
    start: int = 0
    inputs: dict = field(default_factory=dict)  # the inputs' sha256, for provenance
    progress: object | None = None  # a progress bar (``update()``), or None
    images: np.ndarray | None = None
    error: BaseException | None = None
    steps_done: int = 0
    steps_total: int = 0
    _pixels: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def rows(self) -> int:
        return len(self.contexts)

    @property
    def steps_run(self) -> int:
        """The sampler's steps this job takes (image-to-image starts part-way)."""
        return len(self.sampler.timesteps) - self.start

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a batch: the same sampler, steps, eta, spacing,
        picture size, starting step, and inputs (a picture, a mask, resample) or not."""
        c = self.config
        inputs = (self.init is not None, self.mask is not None, c.resample)
        return (c.sampler, c.steps, c.eta, c.spacing, c.size, self.start, inputs)

    @property
    def settings(self) -> dict:
        """The settings that made these images, as resolved (for provenance)."""
        c = self.config
        return {
            "sampler": c.sampler,
            "steps": c.steps,
            "eta": c.eta,
            "spacing": c.spacing,
            "guidance": c.guidance,
            "seed": c.seed,
            **({"size": c.size} if c.size is not None else {}),
            **({"strength": c.strength} if c.strength is not None else {}),
            **({"resample": c.resample} if self.mask is not None else {}),
            **self.inputs,
        }


def plan_runs(jobs: list[Job], batch_size: int | None) -> list[list[tuple[Job, int, int]]]:
    """Split the jobs' rows, in order, into runs of at most ``batch_size`` rows (None: one
    run); each run is a list of parts ``(job, start, stop)``, rows ``start:stop`` of a job."""
    runs: list[list[tuple[Job, int, int]]] = [[]]
    room = batch_size
    for job in jobs:
        start = 0
        while start < job.rows:
            if room == 0:
                runs.append([])
                room = batch_size
            take = job.rows - start if room is None else min(room, job.rows - start)
            runs[-1].append((job, start, start + take))
            start += take
            room = None if room is None else room - take
    return [r for r in runs if r]


class Run:
    """One sampling loop, from Gaussian noise to x_0, over the rows of some jobs' parts."""

    def __init__(self, gen, parts: list[tuple[Job, int, int]]):
        self.gen = gen
        self.parts = [p for p in parts if p[0].error is None]

    def __call__(self) -> None:
        if not self.parts:
            return
        gen = self.gen
        self.size = self.parts[0][0].config.size  # one per batch (batch_key)
        contexts, scales, uncond, seeds, index = self._rows()
        first = self.parts[0][0]  # the batch's shared settings (batch_key)
        sampler = first.sampler.fresh()  # multistep solvers keep per-run history
        start, n_steps = first.start, first.steps_run
        if n_steps == 0:  # strength 0: the pictures are the input's
            for job, a, b in self.parts:
                job._pixels.append(np.repeat(job.init_pixels[None], b - a, axis=0))
            return
        self.unet = GuidedUNet(
            gen.backend,
            gen.unet_graph,
            gen.bundle.sample_shape,
            contexts,
            scales,
            uncond,
            takes_w=gen.unet_takes_w,
        )
        draws = n_steps * (2 + first.config.resample * 3) + 1  # a bound: blocks of normals
        noise = ImageNoise(seeds, index, draws=draws)
        T = gen.schedule.timesteps
        raw = []  # the U-Net's own output of the step (its rows name a culprit)

        def eps_fn(x: np.ndarray, t: int) -> np.ndarray:
            eps, step_raw = self.unet(x, timestep_input(t, T))
            raw[:] = [step_raw]
            return eps

        def on_step(i, t, x, eps, x_next) -> np.ndarray | None:
            ended = self._report(i - start, n_steps, t, x, eps)
            ended |= self._check(i - start, n_steps, t, x_next, eps, raw[0])
            if not ended:
                return None
            keep = ~np.isin(self.owner, list(ended))
            self.owner = self.owner[keep]
            self.unet.keep(keep)  # the loop drops x's, the sampler's and the noise's rows
            return keep

        # Non-finite values are caught by the per-row check with a clear error; NumPy's own
        # warnings about them would only add noise before it.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            shape = (len(contexts), *gen.bundle.sample_shape)
            x = sample_loop(
                eps_fn,
                sampler,
                shape,
                noise,
                on_step=on_step,
                start=start,
                init=self._per_row("init"),
                mask=self._per_row("mask"),
                resample=first.config.resample,
            )
        if not len(x):
            return
        pixels = self._pixels(x)
        for k, (job, _, _) in enumerate(self.parts):
            if job.error is None:
                mine = pixels[self.owner == k]
                if job.mask_pixels is not None:  # the kept region is the input, exactly
                    mine = np.where(job.mask_pixels, mine, job.init_pixels)
                job._pixels.append(mine)

    def _per_row(self, name: str) -> np.ndarray | None:
        """A job input (``init`` or ``mask``) repeated for each of the run's rows."""
        if getattr(self.parts[0][0], name) is None:
            return None
        return np.concatenate(
            [np.repeat(getattr(j, name)[None], b - a, axis=0) for j, a, b in self.parts]
        )

    def _rows(self):
        """Per row of the run, from its part's job: context, guidance scale, unconditional
        context (zeros, or the negative prompt's), seed and image index; and ``owner``,
        each row's part number (rows of ended parts are dropped as the run goes)."""
        d = self.gen.bundle.context_dim
        sizes = [stop - start for _, start, stop in self.parts]
        jobs = [j for j, _, _ in self.parts]
        self.owner = np.repeat(np.arange(len(self.parts)), sizes)
        contexts = np.concatenate([j.contexts[a:b] for j, a, b in self.parts])
        scales = np.concatenate(
            [np.full(n, j.config.guidance, np.float32) for j, n in zip(jobs, sizes, strict=True)]
        )
        zeros = np.zeros(d, np.float32)
        uncond = np.concatenate(
            [
                np.broadcast_to(zeros if j.negative is None else j.negative, (n, d))
                for j, n in zip(jobs, sizes, strict=True)
            ]
        )
        seeds = np.concatenate(
            [np.full(n, j.config.seed, dtype=object) for j, n in zip(jobs, sizes, strict=True)]
        )
        index = np.concatenate([j.image_index[a:b] for j, a, b in self.parts])
        return contexts, scales, uncond, seeds, index

    def _pixels(self, x: np.ndarray) -> np.ndarray:
        """The batch's pictures at its size (the bundle's image unless a cascade's base)."""
        return self.gen.to_pixels(x) if self.size is None else self.gen.to_pixels(x, self.size)

    def _report(self, i: int, n_steps: int, t: int, x: np.ndarray, eps: np.ndarray) -> set[int]:
        """Progress and callbacks of each live part after step ``i``'s U-Net call; returns
        the parts whose callback cancelled (or raised)."""
        ended = set()
        step = i + 1
        live = np.unique(self.owner)

        def wants_preview(job: Job) -> bool:
            every = job.preview_every
            return job.callback is not None and bool(
                every and (step % every == 0 or step == n_steps)
            )

        wanting = [k for k in live if wants_preview(self.parts[k][0])]
        previews = {}
        if wanting:  # one x̂0 and one pixel stage (a latent bundle: one decoder call) for all
            rows = np.flatnonzero(np.isin(self.owner, wanting))
            x0 = predict_x0(x[rows], eps[rows], *self.gen.schedule.x0_coefficients(t))
            pixels = self._pixels(x0)
            for k in wanting:
                previews[k] = pixels[self.owner[rows] == k]
        for k in live:
            job, start, stop = self.parts[k]
            job.steps_done += 1
            if job.progress is not None:
                job.progress.update()
            if job.callback is None:
                continue
            preview = previews.get(k)
            info = StepInfo(
                job.steps_done, job.steps_total, step, n_steps, t, start, stop - start, preview
            )
            try:
                if job.callback(info) is False:
                    job.error = Cancelled(f"cancelled by the callback at step {job.steps_done}")
            except Exception as e:  # the callback's own failure ends its job only
                job.error = e
            if job.error is not None:
                ended.add(int(k))
        return ended

    def _check(
        self, i: int, n_steps: int, t: int, x: np.ndarray, eps: np.ndarray, raw: np.ndarray
    ) -> set[int]:
        """Per row, one pass: NaN, Inf and overflow in eps all reach x_t; only a failing row's
        eps is looked at, to name the culprit. (NaN fails every comparison.)"""
        peak = np.abs(x.reshape(len(x), -1)).max(axis=1)
        bad = ~(peak <= STEP_ABS_MAX)
        if not bad.any():
            return set()
        ended = set()
        for k in np.unique(self.owner[bad]):
            job = self.parts[k][0]
            if job.error is not None:
                continue
            r = int(np.flatnonzero(bad & (self.owner == k))[0])
            # the graph's own output where it is not finite (a guided Inf - Inf reads as NaN)
            noise_rows = [a for a in self.unet.raw_rows(raw, r) if not np.isfinite(a).all()]
            for what, arr in (("predicted noise", (noise_rows or [eps[r]])[0]), ("x_t", x[r])):
                value = float(np.abs(arr).max())
                if not value <= STEP_ABS_MAX:
                    shown = (
                        "NaN"
                        if math.isnan(value)
                        else "Inf"
                        if math.isinf(value)
                        else f"{value:.3g}"
                    )
                    job.error = NumericalError(
                        f"{what} at step {i + 1}/{n_steps} (t={t}) is {shown} "
                        f"(limit {STEP_ABS_MAX:g}; backend {self.gen.backend.name}, U-Net "
                        f"precision {self.gen.unet_precision}): the graph is broken or "
                        "overflowed; no image was produced"
                    )
                    break
            ended.add(int(k))
        return ended


def run_jobs(gen, jobs: list[Job], batch_size: int | None = None) -> None:
    """Run jobs that share a batch key: their rows, in order, in runs of at most
    ``batch_size`` rows (None: all in one). Sets each job's ``images`` or ``error``."""
    if not jobs:
        return
    keys = {job.batch_key for job in jobs}
    if len(keys) > 1:
        raise InputError(f"jobs with different sampler settings cannot share a batch: {keys}")
    runs = plan_runs(jobs, batch_size)
    n_steps = jobs[0].steps_run
    for job in jobs:
        job.steps_total = n_steps * sum(1 for parts in runs for j, _, _ in parts if j is job)
    for parts in runs:
        Run(gen, parts)()
    for job in jobs:
        if job.error is None:
            job.images = np.concatenate(job._pixels)
        job._pixels = []
