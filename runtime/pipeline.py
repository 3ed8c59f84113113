"""``Generator``: prompt -> context -> sampling loop -> uint8 images. No torch anywhere."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .backends import make_backend
from .bundle import Bundle
from .errors import InputError
from .samplers import SAMPLERS, make_sampler, sample_loop, to_uint8
from .schedule import NoiseSchedule
from .text import TextEncoder, parse_blend


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings; CLI flags map one to one onto these fields."""

    num: int = 1
    sampler: str = "ddpm"
    steps: int | None = None  # None: all T steps for ddpm, 50 for ddim
    eta: float | None = None  # ddim only; None: DEFAULT_DDIM_ETA (1.0)
    seed: int = 0
    guidance: float = 1.0  # classifier-free guidance scale; 1 = plain conditional
    batch_size: int = 16

    def validate(self) -> None:
        if self.num < 1:
            raise InputError(f"num must be >= 1, got {self.num}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        if self.sampler not in SAMPLERS:
            raise InputError(
                f"unknown sampler {self.sampler!r} (choose from: {', '.join(SAMPLERS)})"
            )
        if self.guidance < 0:
            raise InputError(f"guidance must be >= 0, got {self.guidance}")
        if not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be a non-negative integer, got {self.seed}")


class Generator:
    """Generate images from a bundle.

    >>> gen = Generator("models/shapes")                      # doctest: +SKIP
    >>> images = gen.generate("red circle", num=4, seed=1)     # (4, 16, 16, 3) uint8
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        backend: str = "ort",
        providers: list[str] | None = None,
        text_precision: str | None = None,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.backend = make_backend(backend, self.bundle, providers)
        self.schedule = NoiseSchedule(self.bundle.schedule)
        self.text: TextEncoder | None = None
        cond = self.bundle.conditioning
        if cond.get("kind") == "text":
            t = cond["text"]
            precision = text_precision or t["default_precision"]
            if precision not in t["graphs"]:
                raise InputError(
                    f"this bundle's text encoder comes in {', '.join(t['graphs'])}, not {precision}"
                )
            self.text = TextEncoder(
                self.backend,
                self.bundle.path / t["tokenizer"],
                t["graphs"][precision],
                int(t["max_tokens"]),
                int(cond["context_dim"]),
            )
        elif text_precision is not None:
            raise InputError("text precision applies to text-conditioned bundles only")

    # -- conditioning -------------------------------------------------------------------
    def context(self, prompt: str) -> np.ndarray:
        """The context vector (D,) for a prompt; the empty prompt is the null (zero) context.

        ``"a:0.7 | b:0.3"`` blends prompts: for text bundles the weighted mean embedding,
        re-normalised; for label bundles the weighted multi-hot vector (the course's mixing).
        """
        d = self.bundle.context_dim
        if self.text is not None:
            return self.text.context(prompt)
        if not prompt.strip():
            return np.zeros(d, dtype=np.float32)
        kind = self.bundle.conditioning.get("kind")
        if kind == "label":
            names = self.bundle.label_names
            lookup = {" ".join(n.lower().split()): i for i, n in enumerate(names)}
            vec = np.zeros(d, dtype=np.float32)
            for text, weight in parse_blend(prompt):
                key = " ".join(text.lower().split())
                if key not in lookup:
                    raise InputError(
                        f"unknown prompt {text!r}; this model knows: {', '.join(names)}"
                    )
                vec[lookup[key]] += weight
            return vec
        raise InputError(
            f"this bundle is conditioned on {kind!r} vectors and takes no text prompt; "
            "pass context= in the Python API"
        )

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
        t_in = np.full((x.shape[0], 1), t / self.schedule.timesteps, dtype=np.float32)
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
        null context of classifier-free guidance, so it needs ``guidance != 1``.
        """
        cfg = replace(config or GenerateConfig(), **overrides)
        cfg.validate()
        if (prompt is None) == (context is None):
            raise InputError("give exactly one of prompt or context")
        if negative_prompt is not None and cfg.guidance == 1.0:
            raise InputError("a negative prompt only acts through guidance: set guidance != 1")
        neg = None if negative_prompt is None else self.context(negative_prompt)
        d = self.bundle.context_dim
        if context is None:
            ctx = np.broadcast_to(self.context(prompt), (cfg.num, d))
        else:
            ctx = np.asarray(context, dtype=np.float32)
            if ctx.ndim == 1:
                ctx = np.broadcast_to(ctx, (cfg.num, ctx.shape[0]))
            if ctx.shape != (cfg.num, d):
                raise InputError(f"context must be ({d},) or ({cfg.num}, {d}), got {ctx.shape}")
        ctx = np.ascontiguousarray(ctx, dtype=np.float32)
        sampler = make_sampler(cfg.sampler, self.schedule, cfg.steps, cfg.eta)
        rng = np.random.Generator(np.random.PCG64(cfg.seed))
        chunks = range(0, cfg.num, cfg.batch_size)
        bar = tqdm(
            total=len(chunks) * len(sampler.timesteps),
            disable=not progress,
            desc=f"{cfg.sampler} x{cfg.num}",
            unit="step",
            leave=False,
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

                out.append(to_uint8(sample_loop(eps_fn, sampler, shape, rng)))
        return np.concatenate(out)
