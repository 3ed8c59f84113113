"""``Generator``: prompt -> context -> sampling loop -> uint8 images. No torch anywhere."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from ddpm_rt.backends import make_backend
from ddpm_rt.bundle.bundle import Bundle
from ddpm_rt.config import (
    MAX_NUM,
    GenerateConfig,
    check_int,
    check_memory,
    check_threads,
    estimate_bytes,
)
from ddpm_rt.core.guidance import GuidedUNet, unet_rows_per_step
from ddpm_rt.core.samplers import to_uint8
from ddpm_rt.core.schedule import NoiseSchedule, timestep_input
from ddpm_rt.errors import BundleError, InputError, NumericalError
from ddpm_rt.images import load_mask, load_picture
from ddpm_rt.progress import StepInfo, progress_bar
from ddpm_rt.run import Job, run_jobs
from ddpm_rt.text import TextEncoder, check_prompt, parse_blend
from ddpm_rt.tolerances import CONTEXT_ABS_MAX, CONTEXT_NORM_ATOL, DECODER_ABS_MAX

__all__ = ["GenerateConfig", "Generator", "StepInfo"]
# The U-Net precision used when a bundle offers it and the caller does not choose; set by
# the evaluation (models/default/MODEL_CARD.md): fp32 unless int8 is no worse there.
DEFAULT_UNET_PRECISION = "fp32"


def _pick(what: str, offered: dict[str, str], precision) -> tuple[str, str]:
    """(precision, its graph) of a graph family the bundle offers as ``offered``."""
    if not isinstance(precision, str) or precision not in offered:
        raise InputError(
            f"this bundle's {what} comes in {', '.join(offered)}, not {precision!r:.20}"
        )
    return precision, offered[precision]


def _check_call(config, callback, preview_every, overrides) -> None:
    """The Python call's own arguments (the request's settings are GenerateConfig's)."""
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable, got {type(callback).__name__}")
    check_int("preview_every", preview_every, 0, 1_000_000)
    if config is not None and not isinstance(config, GenerateConfig):
        raise InputError(f"config must be a GenerateConfig, got {type(config).__name__}")
    known = {f.name for f in fields(GenerateConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(
            f"unknown argument(s) {', '.join(unknown)} (settings: {', '.join(sorted(known))})"
        )


class Generator:
    """Generate images from a bundle.

    Loading checks everything before any sampling: the manifest (strictly), every file it
    uses (size, then sha256 over the very bytes the backend loads), and each graph's live
    inputs and outputs against the bundle's I/O spec. One ``Generator`` may serve several
    threads at once: sessions are shared, caches locked, per-call state local.

    >>> gen = Generator("models/default")                     # doctest: +SKIP
    >>> images = gen.generate("red apple", num=4, seed=1)      # (4, 16, 16, 3) uint8
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        backend: str = "ort",
        providers: list[str] | None = None,
        text_precision: str | None = None,
        *,
        expected_digest: str | None = None,
        threads: int | None = None,
        unet_precision: str | None = None,
        engine_cache: str | Path | None = None,
        decoder_precision: str | None = None,
    ):
        """(Long for this docstring, the arguments' contract.)
        ``expected_digest``: the sha256 of the bundle's manifest.json, from a trusted
        place; a bundle with another digest is refused (``ddpm-rt info`` prints it).
        ``threads``: ONNX Runtime's intra-op threads (default: its own, the physical cores).
        ``unet_precision``: ``fp32`` or a variant the bundle lists (``int8``); default
        :data:`DEFAULT_UNET_PRECISION` when the bundle has it, else fp32.
        ``backend="trt"``: the U-Net (and a latent bundle's decoder, at
        ``decoder_precision``) runs on TensorRT engines built on this machine by
        ``ddpm-rt build-engines`` into ``engine_cache`` (default: the per-user cache); its
        ``int8`` is the bundle's symmetric Q/DQ graph (``int8-qdq``).
        ``decoder_precision``: a latent bundle's decoder graph (``fp32``, or a variant it
        lists); default the bundle's ``latent.decoder.default_precision``."""
        if threads is not None:
            check_threads(threads)
        if isinstance(bundle, Bundle):
            if expected_digest is not None and bundle.digest != expected_digest:
                raise BundleError(
                    f"bundle {bundle.path} has digest {bundle.digest}, not the expected "
                    f"{expected_digest}"
                )
            self.bundle = bundle
        else:
            self.bundle = Bundle.load(bundle, hash_all=False, expected_digest=expected_digest)
        if not isinstance(backend, str):
            raise InputError(f"backend must be a string, got {type(backend).__name__}")
        if text_precision is not None and not isinstance(text_precision, str):
            raise InputError(
                f"text precision must be a string, got {type(text_precision).__name__}"
            )
        self.schedule = NoiseSchedule(self.bundle.schedule)
        self._choose_graphs(backend, unet_precision, text_precision, decoder_precision)
        cache = None
        if engine_cache is not None:
            from ddpm_rt.backends.engine_cache import EngineCache

            cache = EngineCache(engine_cache)
        self.backend = make_backend(
            backend, self.bundle, providers, threads=threads, engine_cache=cache
        )
        # Sessions the generation path uses are created (and checked) now, not mid-call.
        for graph in (self.unet_graph, self.decoder_graph, self.text_graph):
            if graph is not None:
                self.backend.session(graph)
        self.text: TextEncoder | None = None
        if self.text_graph is not None:
            t = self.bundle.conditioning["text"]
            self.text = TextEncoder(
                self.backend,
                self.bundle.read_file(t["tokenizer"]),
                self.text_graph,
                int(t["max_tokens"]),
                int(self.bundle.conditioning["context_dim"]),
            )

    def _choose_graphs(self, backend: str, unet, text, decoder) -> None:
        """Each graph family's precision and graph: the one asked for, else the default
        (:data:`DEFAULT_UNET_PRECISION` if offered; the text encoder's and the decoder's:
        the bundle's), refused unless the bundle offers it. On TensorRT the U-Net's
        ``int8`` is the bundle's symmetric Q/DQ graph."""
        b = self.bundle
        variants = b.unet_precisions
        if unet is None:
            unet = DEFAULT_UNET_PRECISION if DEFAULT_UNET_PRECISION in variants else "fp32"
        if backend == "trt" and isinstance(unet, str):
            from ddpm_rt.backends.trt_build import trt_variant, unet_graph_for

            self.unet_graph, self.unet_precision = unet_graph_for(b, unet), unet
            self.unet_variant = trt_variant(unet)  # int8: the Q/DQ graph's entry
        else:
            self.unet_precision, self.unet_graph = _pick("U-Net", variants, unet)
            self.unet_variant = self.unet_precision
        # a distilled U-Net (issue 29): what it was distilled for; a guidance-distilled one
        # takes w and makes no unconditional pass
        self.distilled = b.distillation(self.unet_variant)
        self.unet_takes_w = bool((self.distilled or {}).get("guidance"))
        self.text_precision = self.text_graph = None  # a text bundle's encoder
        if b.conditioning["kind"] == "text":
            t = b.conditioning["text"]
            offered = t["graphs"]
            asked = text or t["default_precision"]
            self.text_precision, self.text_graph = _pick("text encoder", offered, asked)
        elif text is not None:
            raise InputError("text precision applies to text-conditioned bundles only")
        self.decoder_precision = self.decoder_graph = None  # a latent bundle's decoder
        if b.decoder_precisions:
            asked = decoder or b.latent["decoder"]["default_precision"]
            self.decoder_precision, self.decoder_graph = _pick(
                "decoder", b.decoder_precisions, asked
            )
        elif decoder is not None:
            raise InputError("decoder precision applies to latent bundles only")

    def provenance(self, job: Job | None = None) -> dict:
        """What made an image, for a PNG's settings chunk. Without ``job``: this generator's
        part (the U-Net and text precisions, the bundle's digest, a latent bundle's decoder
        and its precision). With a job from :meth:`prepare`: the whole record -- prompts,
        settings as the run resolved them (steps, eta, spacing filled in; ``size`` when not
        the bundle's image), this generator's part (no decoder when none ran) and the
        ddpm-rt version. The CLI and the server write exactly this."""
        from ddpm_rt import __version__

        facts = {
            "unet_precision": self.unet_precision,
            "text_precision": self.text_precision,
            "bundle_digest": self.bundle.digest,
        }
        decoded = job is None or job.config.size is None  # a cascade's base picture: no decoder
        if self.decoder_graph is not None and decoded:
            facts["decoder"] = self.decoder_graph
            facts["decoder_precision"] = self.decoder_precision
        if job is None:
            return facts
        return {
            "prompts": job.prompts,
            "negative_prompt": job.negative_prompt,
            "num": job.config.num,
            **job.settings,  # seed, sampler, steps, eta, spacing, guidance (and size)
            **facts,
            "ddpm_rt": __version__,
        }

    # -- conditioning -------------------------------------------------------------------
    def context(self, prompt: str) -> np.ndarray:
        """The context vector (D,) for a prompt (a copy); the empty prompt is the null
        (zero) context.

        ``"a:0.7 | b:0.3"`` blends prompts: for text bundles the weighted mean embedding,
        re-normalised; for label bundles the weighted multi-hot vector (the course's mixing).
        """
        check_prompt(prompt)
        return self._context(prompt)

    def _context(self, prompt: str) -> np.ndarray:
        """:meth:`context` of a prompt already checked."""
        d = self.bundle.context_dim
        if self.text is not None:
            return self.text.context(prompt).copy()
        if not prompt.strip():
            return np.zeros(d, dtype=np.float32)
        kind = self.bundle.conditioning["kind"]
        if kind == "label":
            names = self.bundle.label_names
            lookup = {" ".join(n.lower().split()): i for i, n in enumerate(names)}
            vec = np.zeros(d, dtype=np.float32)
            for text, weight in parse_blend(prompt):
                key = " ".join(text.lower().split())
                if key not in lookup:
                    shown = repr(text if len(text) <= 40 else text[:37] + "...")
                    raise InputError(
                        f"unknown prompt {shown}; this model knows: {', '.join(names)}"
                    )
                vec[lookup[key]] += weight
            return self.check_context(vec)
        raise InputError(
            f"this bundle is conditioned on {kind!r} vectors and takes no text prompt; "
            "pass context= in the Python API"
        )

    def check_context(self, ctx) -> np.ndarray:
        """A context array (D,) or (N, D) as float32, refused unless it is finite and in range:
        for text bundles each row unit length (within CONTEXT_NORM_ATOL) or exactly zero
        (the null context); otherwise entries within +-CONTEXT_ABS_MAX."""
        if isinstance(ctx, (str, bytes)) or ctx is None:
            raise InputError(f"context must be a numeric array, got {type(ctx).__name__}")
        try:
            arr = np.asarray(ctx)
            ok_kind = arr.dtype.kind in "fiu"
            arr = arr.astype(np.float32) if ok_kind else arr
        except (TypeError, ValueError, OverflowError):
            ok_kind = False
        if not ok_kind:
            raise InputError(f"context must be a numeric array, got {type(ctx).__name__}")
        d = self.bundle.context_dim
        if arr.ndim not in (1, 2) or arr.shape[-1] != d:
            raise InputError(f"context must have shape ({d},) or (N, {d}), got {arr.shape}")
        rows = arr.reshape(-1, d).astype(np.float64)
        if not np.isfinite(rows).all():
            raise InputError("context holds NaN or Inf")
        if self.text is not None or self.bundle.conditioning["kind"] == "text":
            norms = np.linalg.norm(rows, axis=1)
            bad = ~((np.abs(norms - 1.0) <= CONTEXT_NORM_ATOL) | (norms == 0.0))
            if bad.any():
                raise InputError(
                    f"context row {int(np.argmax(bad))} has norm {norms[bad][0]:.4g}: a text "
                    f"bundle's context is unit length (within {CONTEXT_NORM_ATOL:g}) or zero"
                )
        elif rows.size and np.abs(rows).max() > CONTEXT_ABS_MAX:
            raise InputError(
                f"context values must lie within +-{CONTEXT_ABS_MAX:g}, "
                f"got {np.abs(rows).max():.3g}"
            )
        return arr

    # -- sampling -----------------------------------------------------------------------
    def to_pixels(self, x0: np.ndarray, size: int | None = None) -> np.ndarray:
        """The final stage: x_0 (B, C, h, w) as the U-Net samples it -> images (B, H, W, 3)
        uint8. A latent bundle's decoder graph turns the latents into pixels first (its
        output is checked against :data:`DECODER_ABS_MAX`: a broken or overflowed decoder is
        an error, not an all-black or all-white image); a cascade's base picture (``size``
        its height) is taken as it is, without the decoder."""
        if self.decoder_graph is None or self.bundle.output_shape(size) != self.bundle.image_shape:
            return to_uint8(x0)
        latent = np.ascontiguousarray(x0, dtype=np.float32)
        image = self.backend.run(self.decoder_graph, {"latent": latent})["image"]
        peak = float(np.abs(image).max()) if image.size else 0.0
        if not peak <= DECODER_ABS_MAX:  # NaN fails too
            shown = "NaN" if math.isnan(peak) else "Inf" if math.isinf(peak) else f"{peak:.3g}"
            file = self.bundle.manifest["graphs"][self.decoder_graph]["file"]
            raise NumericalError(
                f"the decoder's output reaches {shown}: its contract is pixels in [-1, 1] "
                f"(limit +-{DECODER_ABS_MAX:g}; graph {self.decoder_graph} ({file}), backend "
                f"{self.backend.name}, decoder precision {self.decoder_precision}): the graph "
                "is broken or overflowed; no image was produced"
            )
        return to_uint8(image)

    def eps(
        self,
        x: np.ndarray,
        t: int,
        c: np.ndarray,
        guidance: float = 1.0,
        uncond: np.ndarray | None = None,
    ) -> np.ndarray:
        """Predicted noise for x (B,C,H,W) at integer timestep t with contexts c (B,D).

        With ``guidance != 1`` conditional and unconditional rows go through one U-Net call:
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)  (Ho & Salimans 2022, eq. 6).
        ``uncond`` (B,D) replaces the null context (a negative prompt); default zeros. A
        guidance-distilled U-Net takes ``guidance`` as its input ``w`` in the same one call
        per row, and has no unconditional pass to give ``uncond`` to.
        """
        b = x.shape[0]
        if uncond is not None and self.unet_takes_w:
            raise InputError(
                f"the guidance-distilled U-Net ({self.unet_precision}) makes no unconditional "
                "pass: uncond cannot apply"
            )
        unet = GuidedUNet(
            self.backend,
            self.unet_graph,
            x.shape[1:],
            c,
            np.full(b, guidance, np.float32),
            np.zeros_like(c) if uncond is None else uncond,
            takes_w=self.unet_takes_w,
        )
        return unet(x, timestep_input(t, self.schedule.timesteps))[0]

    def unet_rows_per_image(self, config: GenerateConfig | None = None) -> int:
        """U-Net image-evaluations one text-to-image image costs at ``config`` (None: the
        defaults), resolved as a run of this Generator's U-Net resolves it: its steps, each
        one row, two with guidance (the unconditional pass) unless the U-Net takes w."""
        cfg, sampler = (config or GenerateConfig()).resolve(
            self.bundle, None, unet_precision=self.unet_variant
        )
        return len(sampler.timesteps) * unet_rows_per_step(cfg.guidance, self.unet_takes_w)

    def prepare(
        self,
        prompt: str | list[str] | None = None,
        *,
        context: np.ndarray | None = None,
        negative_prompt: str | None = None,
        config: GenerateConfig | None = None,
        callback: Callable[[StepInfo], bool | None] | None = None,
        preview_every: int = 0,
        init_image=None,
        mask=None,
        **overrides,
    ) -> Job:
        """Check a request and resolve it to rows (contexts, seeds, image indices, guidance,
        negative context) without running anything: arguments as :meth:`generate`. Run it
        with :meth:`run_jobs`, alone or beside other jobs with the same
        :attr:`Job.batch_key`."""
        _check_call(config, callback, preview_every, overrides)
        if (prompt is None) == (context is None):
            raise InputError("give exactly one of prompt or context")
        prompts = None if prompt is None else self._prompts(prompt)
        if negative_prompt is not None:
            check_prompt(negative_prompt, "negative prompt")
        cfg = replace(config or GenerateConfig(), **overrides)
        cfg, sampler = cfg.resolve(
            self.bundle,
            negative_prompt,
            init_image=init_image is not None,
            mask=mask is not None,
            unet_precision=self.unet_variant,
        )
        inputs = self._inputs(init_image, mask, cfg, len(sampler.timesteps))
        rows = len(prompts) if prompts else 1
        if rows * cfg.num > MAX_NUM:
            raise InputError(f"{rows} prompts x {cfg.num} images is over the limit of {MAX_NUM}")
        check_memory(
            f"generating {rows * cfg.num} images",
            estimate_bytes(
                cfg, self.bundle.output_shape(cfg.size), rows, sample=self.bundle.sample_shape
            ),
        )
        ctx = self._contexts(prompts, context, cfg.num)
        neg = None if negative_prompt is None else self._context(negative_prompt)
        return Job(
            config=cfg,
            sampler=sampler,
            contexts=ctx,
            image_index=np.tile(np.arange(cfg.num), rows),  # i of (prompt j, image i)
            negative=neg,
            prompts=list(prompts) if prompts is not None else None,
            negative_prompt=negative_prompt,
            callback=callback,
            preview_every=preview_every,
            **inputs,
        )

    def _inputs(self, init_image, mask, cfg: GenerateConfig, steps: int) -> dict:
        """A request's picture and mask as a :class:`Job` takes them (nothing without an
        init image): read and checked (:func:`ddpm_rt.images.load_picture`), in the U-Net's
        space and the output's, the step the run starts at, and their sha256 for
        provenance. The U-Net's space is the picture itself, or a cascade's base picture
        (its box average, the projection the decoder keeps); a mask pixel there is repainted
        if any output pixel it covers is."""
        if init_image is None:
            return {}
        b = self.bundle
        if b.latent and b.base_shape is None:
            raise InputError(
                "this bundle's latent needs an encoder graph to start from a picture, and it "
                "has none (a bundle whose latent is the pixels, like a cascade, needs none)",
                "init_image",
            )
        _, big_h, big_w = b.image_shape
        _, h, w = b.sample_shape
        k = big_h // h  # 1, or a cascade's factor
        picture = load_picture(init_image, big_h, big_w)
        big = picture.astype(np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1)
        init = big.reshape(3, h, k, w, k).mean(axis=(2, 4), dtype=np.float32)
        base = cfg.size is not None  # the cascade's base picture is the output
        out = {
            "init": init,
            "init_pixels": to_uint8(init[None])[0] if base else picture,
            "start": cfg.start_step(steps),
            "inputs": {"init_image_sha256": hashlib.sha256(picture.tobytes()).hexdigest()},
        }
        if out["start"] == 0 and mask is None:  # strength 1: text-to-image, the picture unused
            del out["init"], out["init_pixels"]  # (so it batches as text-to-image does)
        if mask is not None:
            repaint = load_mask(mask, big_h, big_w)
            small = repaint.reshape(h, k, w, k).any(axis=(1, 3))
            out["mask"] = small[None]
            out["mask_pixels"] = (small if base else repaint)[..., None]
            digest = hashlib.sha256(repaint.astype(np.uint8).tobytes()).hexdigest()
            out["inputs"]["mask_sha256"] = digest
        return out

    def _contexts(self, prompts: list[str] | None, context, num: int) -> np.ndarray:
        """(rows, D) float32: ``num`` rows per prompt, prompt-major, or a raw context's."""
        d = self.bundle.context_dim
        if prompts is not None:
            ctx = np.repeat(np.stack([self._context(p) for p in prompts]), num, axis=0)
        else:
            ctx = self.check_context(context)
            if ctx.ndim == 1:
                ctx = np.broadcast_to(ctx, (num, d))
            if ctx.shape != (num, d):
                raise InputError(f"context must be ({d},) or ({num}, {d}), got {ctx.shape}")
        return np.ascontiguousarray(ctx, dtype=np.float32)

    @staticmethod
    def _prompts(prompt) -> list[str]:
        """A request's prompt(s) as a checked list (one string: a list of one)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise InputError(
                f"prompt must be a string or a non-empty list of strings, "
                f"got {type(prompt).__name__}",
                "prompt",
            )
        for p in prompts:
            check_prompt(p)
        return list(prompts)

    def run(self, job: Job, progress: bool = False) -> np.ndarray:
        """Run one prepared job in chunks of its ``batch_size`` (a progress bar on stderr if
        ``progress``); returns its images, or raises what ended it."""
        cfg = job.config
        total = job.rows
        chunks = -(-total // cfg.batch_size)
        with progress_bar(progress, chunks * job.steps_run, f"{cfg.sampler} x{total}") as bar:
            job.progress = bar if progress else None
            self.run_jobs([job], batch_size=cfg.batch_size)
        if job.error is not None:
            raise job.error
        return job.images

    def run_jobs(self, jobs: list[Job], batch_size: int | None = None) -> None:
        """Run jobs that share a :attr:`Job.batch_key` as one batch: each step is one U-Net
        call over the rows of all of them (in runs of at most ``batch_size`` rows; None: all
        in one), guidance and negative prompt per row. Sets each job's ``images``, or its
        ``error`` when it was cancelled or its rows turned non-finite (the others go on)."""
        run_jobs(self, jobs, batch_size)

    def generate(
        self,
        prompt: str | list[str] | None = None,
        *,
        context: np.ndarray | None = None,
        negative_prompt: str | None = None,
        config: GenerateConfig | None = None,
        progress: bool = False,
        callback: Callable[[StepInfo], bool | None] | None = None,
        preview_every: int = 0,
        init_image=None,
        mask=None,
        **overrides,
    ) -> np.ndarray:
        """Generate ``num`` images per prompt (or for a raw context). Returns (N, H, W, 3) uint8.

        ``prompt`` may be a list: ``num`` images for each prompt, in one batch, prompt-major
        (rows of ``num``); row j is exactly what ``generate(prompt[j], ...)`` gives with the
        same seed, because image i of every prompt draws its noise from the stream of
        (seed, i) (see :mod:`ddpm_rt.core.noise`). Keyword overrides are :class:`GenerateConfig`
        fields (``num``, ``seed``, ``sampler``, ``steps``, ``eta``, ``guidance``,
        ``batch_size``, ``spacing``, ``size``: a cascade's base picture, e.g. 16); a setting
        left None is the bundle's recommended one
        (:meth:`GenerateConfig.with_defaults`). ``negative_prompt`` replaces the null context of
        classifier-free guidance, so it needs ``guidance != 1``. Every argument is checked
        before any work; a step whose predicted noise or result is not finite (or absurdly
        large) raises :class:`NumericalError` and nothing is returned.

        ``init_image`` (a PNG/JPEG/WebP path or an (H, W[, 3|4]) uint8 or [0, 1] float array,
        any size: resized to the model's picture, transparency on white) starts from a
        picture (SDEdit): ``strength`` in [0, 1] (default 0.8) says how much is redrawn, the
        run starting at the step it selects (``steps - min(int(steps * strength), steps)``)
        from the picture noised to that step with each image's own noise; 0 returns the
        picture, 1 is text-to-image with the same seed, byte for byte. ``mask`` (a picture or
        array; grey >= 128 of 255 is repainted, the rest kept exactly) inpaints: after every
        step the kept region is the picture noised to the next step; ``resample`` adds
        RePaint's jumps for a smoother seam. The noise draws' order is
        :func:`ddpm_rt.core.samplers.sample_loop`'s (docs/bundle-format.md, "Noise").

        ``callback(info)`` is called after every step with a :class:`StepInfo` (step and total
        across the call, the chunk's images, and -- when ``preview_every`` > 0 -- every
        ``preview_every`` steps and at each chunk's last step a uint8 preview of the current
        clean-image estimate x̂0). Returning ``False`` stops the call cleanly: it raises
        :class:`Cancelled`. The callback runs in the calling thread; what it holds is a copy.
        """
        job = self.prepare(
            prompt,
            context=context,
            negative_prompt=negative_prompt,
            config=config,
            callback=callback,
            preview_every=preview_every,
            init_image=init_image,
            mask=mask,
            **overrides,
        )
        return self.run(job, progress)
