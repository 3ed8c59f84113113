"""``Generator``: prompt -> context -> sampling loop -> uint8 images. No torch anywhere."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .backends import make_backend
from .bundle import Bundle
from .errors import BundleError, InputError, NumericalError
from .manifest import MAX_TIMESTEPS
from .samplers import SAMPLERS, make_sampler, sample_loop, to_uint8
from .schedule import NoiseSchedule, timestep_input
from .text import TextEncoder, check_prompt, parse_blend
from .tolerances import CONTEXT_ABS_MAX, CONTEXT_NORM_ATOL, STEP_ABS_MAX

MAX_NUM = 100_000  # images per call; memory is checked separately, against this machine
MAX_BATCH_SIZE = 4096
MAX_GUIDANCE = 50.0  # beyond this guided noise leaves the model's range (and is useless)
MAX_SEED = 2**63 - 1


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


def check_int(name: str, v, lo: int, hi: int) -> int:
    if not _is_int(v):
        raise InputError(f"{name} must be an integer, got {type(v).__name__} {v!r:.40}")
    if not lo <= v <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {v}")
    return int(v)


def check_real(name: str, v, lo: float, hi: float) -> float:
    if not _is_real(v):
        raise InputError(f"{name} must be a number, got {type(v).__name__} {v!r:.40}")
    if not (math.isfinite(v) and lo <= v <= hi):  # NaN and Inf fail here
        raise InputError(f"{name} must be a finite number between {lo:g} and {hi:g}, got {v}")
    return float(v)


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings; CLI flags map one to one onto these fields."""

    num: int = 1
    sampler: str = "ddpm"
    steps: int | None = None  # None: all T steps for ddpm, 50 for ddim
    eta: float | None = None  # ddim only, in [0, 1]; None: DEFAULT_DDIM_ETA (1.0)
    seed: int = 0
    guidance: float = 1.0  # classifier-free guidance scale in [0, 50]; 1 = plain conditional
    batch_size: int = 16

    def validate(self) -> None:
        """Types and ranges of every field; raises :class:`InputError` naming the field."""
        check_int("num", self.num, 1, MAX_NUM)
        check_int("batch size", self.batch_size, 1, MAX_BATCH_SIZE)
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLERS:
            raise InputError(
                f"unknown sampler {self.sampler!r:.40} (choose from: {', '.join(SAMPLERS)})"
            )
        if self.steps is not None:
            check_int("steps", self.steps, 1, MAX_TIMESTEPS)
        if self.eta is not None:
            check_real("eta", self.eta, 0.0, 1.0)
        check_real("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        check_int("seed", self.seed, 0, MAX_SEED)


def memory_limit() -> int:
    """Bytes one generation may plan to use: half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small device
        return 2 * 2**30


def estimate_bytes(cfg: GenerateConfig, image_shape: tuple[int, int, int]) -> int:
    """What a call will allocate, roughly: the uint8 results plus, for the rows of one U-Net
    call, x_t, eps, noise and their copies, and the U-Net's activations (about 64 image-sized
    float32 tensors per row at this project's widths)."""
    c, h, w = image_shape
    rows = min(cfg.batch_size, cfg.num) * (1 if cfg.guidance == 1.0 else 2)
    return cfg.num * h * w * c + rows * c * h * w * 4 * (8 + 64)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(what: str, need: int) -> None:
    limit = memory_limit()
    if need > limit:
        raise InputError(
            f"{what} needs about {_size(need)}, over the limit of {_size(limit)} "
            "(half of this machine's memory)"
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
    ):
        """``expected_digest``: the sha256 of the bundle's manifest.json, from a trusted
        place; a bundle with another digest is refused (``ddpm-rt info`` prints it)."""
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
        self.text: TextEncoder | None = None
        self.unet_precision = "fp32"
        cond = self.bundle.conditioning
        if cond["kind"] == "text":
            t = cond["text"]
            precision = text_precision or t["default_precision"]
            if precision not in t["graphs"]:
                raise InputError(
                    f"this bundle's text encoder comes in {', '.join(t['graphs'])}, "
                    f"not {precision!r:.20}"
                )
            self.text_precision = precision
        elif text_precision is not None:
            raise InputError("text precision applies to text-conditioned bundles only")
        self.backend = make_backend(backend, self.bundle, providers)
        # Sessions the generation path uses are created (and checked) now, not mid-call.
        self.backend.session("unet")
        if cond["kind"] == "text":
            graph = t["graphs"][precision]
            self.backend.session(graph)
            self.text = TextEncoder(
                self.backend,
                self.bundle.read_file(t["tokenizer"]),
                graph,
                int(t["max_tokens"]),
                int(cond["context_dim"]),
            )

    # -- conditioning -------------------------------------------------------------------
    def context(self, prompt: str) -> np.ndarray:
        """The context vector (D,) for a prompt (a copy); the empty prompt is the null
        (zero) context.

        ``"a:0.7 | b:0.3"`` blends prompts: for text bundles the weighted mean embedding,
        re-normalised; for label bundles the weighted multi-hot vector (the course's mixing).
        """
        d = self.bundle.context_dim
        check_prompt(prompt)
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
        ``uncond`` (B,D) replaces the null context (a negative prompt); default zeros.
        """
        b = x.shape[0]
        if guidance != 1.0:
            x = np.concatenate([x, x])
            c = np.concatenate([c, np.zeros_like(c) if uncond is None else uncond])
        t_in = np.full(
            (x.shape[0], 1), timestep_input(t, self.schedule.timesteps), dtype=np.float32
        )
        out = self.backend.run("unet", {"x": x, "t": t_in, "c": c})["eps"]
        if guidance == 1.0:
            return out
        cond, uncond = out[:b], out[b:]
        return uncond + np.float32(guidance) * (cond - uncond)

    def generate(
        self,
        prompt: str | None = None,
        *,
        context: np.ndarray | None = None,
        negative_prompt: str | None = None,
        config: GenerateConfig | None = None,
        progress: bool = False,
        **overrides,
    ) -> np.ndarray:
        """Generate ``num`` images for a prompt (or a raw context). Returns (N, H, W, 3) uint8.

        Keyword overrides are :class:`GenerateConfig` fields (``num``, ``seed``, ``sampler``,
        ``steps``, ``eta``, ``guidance``, ``batch_size``). ``negative_prompt`` replaces the
        null context of classifier-free guidance, so it needs ``guidance != 1``. Every
        argument is checked before any work; a step whose predicted noise or result is not
        finite (or absurdly large) raises :class:`NumericalError` and nothing is returned.
        """
        if config is not None and not isinstance(config, GenerateConfig):
            raise InputError(f"config must be a GenerateConfig, got {type(config).__name__}")
        known = {f.name for f in fields(GenerateConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputError(
                f"unknown argument(s) {', '.join(unknown)} (settings: {', '.join(sorted(known))})"
            )
        cfg = replace(config or GenerateConfig(), **overrides)
        cfg.validate()
        if (prompt is None) == (context is None):
            raise InputError("give exactly one of prompt or context")
        if negative_prompt is not None:
            check_prompt(negative_prompt, "negative prompt")
            if cfg.guidance == 1.0:
                raise InputError("a negative prompt only acts through guidance: set guidance != 1")
        sampler = make_sampler(cfg.sampler, self.schedule, cfg.steps, cfg.eta)
        check_memory(f"generating {cfg.num} images", estimate_bytes(cfg, self.bundle.image_shape))
        d = self.bundle.context_dim
        if context is None:
            ctx = np.broadcast_to(self.context(prompt), (cfg.num, d))
        else:
            ctx = self.check_context(context)
            if ctx.ndim == 1:
                ctx = np.broadcast_to(ctx, (cfg.num, d))
            if ctx.shape != (cfg.num, d):
                raise InputError(f"context must be ({d},) or ({cfg.num}, {d}), got {ctx.shape}")
        neg = None if negative_prompt is None else self.context(negative_prompt)
        ctx = np.ascontiguousarray(ctx, dtype=np.float32)
        rng = np.random.Generator(np.random.PCG64(cfg.seed))
        chunks = range(0, cfg.num, cfg.batch_size)
        n_steps = len(sampler.timesteps)
        bar = tqdm(
            total=len(chunks) * n_steps,
            disable=not progress,
            desc=f"{cfg.sampler} x{cfg.num}",
            unit="step",
            leave=False,
        )

        def check_step(i: int, t: int, eps: np.ndarray, x: np.ndarray) -> None:
            for what, arr in (("predicted noise", eps), ("x_t", x)):
                peak = float(np.abs(arr).max())  # NaN propagates; one pass
                if not peak <= STEP_ABS_MAX:
                    value = (
                        "NaN" if math.isnan(peak) else "Inf" if math.isinf(peak) else f"{peak:.3g}"
                    )
                    raise NumericalError(
                        f"{what} at step {i + 1}/{n_steps} (t={t}) is {value} "
                        f"(limit {STEP_ABS_MAX:g}; backend {self.backend.name}, U-Net precision "
                        f"{self.unet_precision}): the graph is broken or overflowed; no image "
                        "was produced"
                    )

        out = []
        with bar:
            for start in chunks:
                c = ctx[start : start + cfg.batch_size]
                shape = (len(c), *self.bundle.image_shape)
                u = None if neg is None else np.ascontiguousarray(np.broadcast_to(neg, c.shape))

                def eps_fn(x, t, c=c, u=u):
                    bar.update()
                    return self.eps(x, t, c, cfg.guidance, u)

                # Non-finite values are caught by check_step with a clear error; NumPy's own
                # warnings about them would only add noise before it.
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    x = sample_loop(eps_fn, sampler, shape, rng, on_step=check_step)
                out.append(to_uint8(x))
        return np.concatenate(out)
