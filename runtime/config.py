"""Generation settings and the checks every entry point applies before any work."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

import numpy as np

from ddpm_rt.bundle.manifest import MAX_GUIDANCE, MAX_TIMESTEPS
from ddpm_rt.core.samplers import (
    DEFAULT_DDIM_ETA,
    DEFAULT_STEPS,
    SAMPLERS,
    SPACINGS,
    Sampler,
    make_sampler,
    resolve_settings,
)
from ddpm_rt.core.schedule import NoiseSchedule
from ddpm_rt.errors import InputError

if TYPE_CHECKING:
    from ddpm_rt.bundle.bundle import Bundle

# The settings for a bundle that recommends none (FALLBACK, below), named early: the
# settings' help texts quote them.
_FB_SAMPLER, _FB_ETA, _FB_GUIDANCE = "ddim", 1.0, 2.0
DEFAULT_STRENGTH = 0.8  # diffusers' image-to-image default
MAX_RESAMPLE = 20
MAX_NUM = 100_000  # images per call; memory is checked separately, against this machine
MAX_BATCH_SIZE = 4096
MAX_SEED = 2**63 - 1


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


def check_int(name: str, v, lo: int, hi: int, field: str | None = None) -> int:
    if not _is_int(v):
        raise InputError(f"{name} must be an integer, got {type(v).__name__} {v!r:.40}", field)
    if not lo <= v <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}, got {v}", field)
    return int(v)


def check_real(name: str, v, lo: float, hi: float, field: str | None = None) -> float:
    if not _is_real(v):
        raise InputError(f"{name} must be a number, got {type(v).__name__} {v!r:.40}", field)
    if not (math.isfinite(v) and lo <= v <= hi):  # NaN and Inf fail here
        raise InputError(
            f"{name} must be a finite number between {lo:g} and {hi:g}, got {v}", field
        )
    return float(v)


@dataclass(frozen=True)
class Setting:
    """One field of a generation request, written once: its type, bounds or choices and its
    help. :meth:`GenerateConfig.validate` checks with it; the CLI's flags
    (``cli.generate``), the HTTP API's fields and OpenAPI schema (``tools.serve.api``) and
    the C ABI's options (``capi``) are made from :data:`SETTINGS`."""

    kind: str  # "int" | "real" | "choice"
    help: str
    lo: float = 0
    hi: float = 0
    choices: tuple[str, ...] = ()
    label: str | None = None  # the name errors use, if not the field's
    optional: bool = True  # None allowed: the bundle's (or the sampler's) default

    @property
    def json_type(self) -> str:
        return {"int": "integer", "real": "number", "choice": "string"}[self.kind]

    def check(self, name: str, v):
        """``v`` as this setting takes it, or :class:`InputError` naming the field."""
        label = self.label or name
        if self.kind == "int":
            return check_int(label, v, int(self.lo), int(self.hi), name)
        if self.kind == "real":
            return check_real(label, v, self.lo, self.hi, name)
        if not isinstance(v, str) or v not in self.choices:
            raise InputError(
                f"unknown {label} {v!r:.40} (choose from: {', '.join(self.choices)})", name
            )
        return v


def _setting(default, setting: Setting):
    return field(default=default, metadata={"setting": setting})


@dataclass(frozen=True)
class GenerateConfig:
    """The settings of a generation request: the one schema every interface derives from.

    CLI flags, HTTP fields and C options map one to one onto these fields (their checks and
    help are each field's :class:`Setting`, collected in :data:`SETTINGS`)."""

    # Each field's check and help are its Setting (the one schema of a request); None means
    # the bundle's recommended setting (its manifest's ``recommended``, written by
    # ``ddpm-rt eval --write-recommended``), else FALLBACK (steps, eta: the sampler's own).
    num: int = _setting(
        1, Setting("int", "images per prompt (default 1)", 1, MAX_NUM, optional=False)
    )
    sampler: str | None = _setting(
        None,
        Setting(
            "choice",
            "sampler (default: the model's recommended sampler, steps and eta; for a model "
            f"without them {_FB_SAMPLER}, {DEFAULT_STEPS[_FB_SAMPLER]} steps, eta "
            f"{_FB_ETA:g})",
            choices=SAMPLERS,
        ),
    )
    steps: int | None = _setting(
        None,
        Setting(
            "int",
            "sampling steps (ddpm: all T; "
            + "; ".join(f"{k}: {v}" for k, v in DEFAULT_STEPS.items())
            + ")",
            1,
            MAX_TIMESTEPS,
        ),
    )
    eta: float | None = _setting(
        None,
        Setting(
            "real",
            f"ddim stochasticity in [0, 1]: 0 deterministic (default {DEFAULT_DDIM_ETA:g})",
            0.0,
            1.0,
        ),
    )
    seed: int = _setting(0, Setting("int", "noise seed (default 0)", 0, MAX_SEED, optional=False))
    guidance: float | None = _setting(
        None,
        Setting(
            "real",
            f"classifier-free guidance scale in [0, {MAX_GUIDANCE:g}]; 1 = plain conditional "
            f"(default: the model's recommended, else {_FB_GUIDANCE:g})",
            0.0,
            MAX_GUIDANCE,
        ),
    )
    batch_size: int = _setting(
        16,
        Setting(
            "int",
            "images per U-Net call (default 16)",
            1,
            MAX_BATCH_SIZE,
            label="batch size",
            optional=False,
        ),
    )
    spacing: str | None = _setting(
        None,
        Setting("choice", "few-step samplers' timesteps (default time)", choices=SPACINGS),
    )
    size: int | None = _setting(
        None,
        Setting(
            "int",
            "picture height: the model's (default), or a cascade's base picture (16: the "
            "U-Net's own sprite, no super-resolution decoder); 'ddpm-rt info' lists them",
            1,
            1 << 16,
        ),
    )

    # Image-to-image (issue 28): how far from the init image the run starts; None: 0.8
    # (DEFAULT_STRENGTH) when there is one. Meaningless without one: refused by resolve().
    strength: float | None = _setting(
        None,
        Setting(
            "real",
            "image-to-image: how much of the init image to redraw, 0 (none: the input) to 1 "
            f"(all: text-to-image); default {DEFAULT_STRENGTH:g}",
            0.0,
            1.0,
        ),
    )
    resample: int = _setting(
        0,
        Setting(
            "int",
            "inpainting: RePaint's jumps per step, for a smoother seam (default 0; each "
            "costs one more U-Net call per step)",
            0,
            MAX_RESAMPLE,
            optional=False,
        ),
    )

    def validate(self) -> None:
        """Types and ranges of every field (:data:`SETTINGS`); raises :class:`InputError`
        naming the field."""
        for name, setting in SETTINGS.items():
            value = getattr(self, name)
            if value is not None or not setting.optional:
                setting.check(name, value)

    def check_inputs(self, init_image: bool, mask: bool) -> None:
        """The rules of image-to-image and inpainting, whether a request gives an init image
        and a mask: a mask needs an init image, strength an init image, resample a mask."""
        if mask and not init_image:
            raise InputError("a mask needs an init image (the picture it masks)", "mask")
        if self.strength is not None and not init_image:
            raise InputError("strength needs an init image to start from", "strength")
        if self.resample and not mask:
            raise InputError("resample needs a mask (it smooths an inpainting's seam)", "resample")

    def start_step(self, steps: int) -> int:
        """The sampler step an image-to-image run starts at, of ``steps``: the last
        ``min(int(steps * strength), steps)`` are taken, as diffusers does (0 without a
        strength: all of them)."""
        if self.strength is None:
            return 0
        return steps - min(int(steps * self.strength), steps)

    def check_negative_prompt(self, negative_prompt: str | None) -> None:
        """The one rule for a negative prompt: it replaces classifier-free guidance's null
        context, so it acts only when guidance != 1 (a guidance still None -- the model's --
        is checked once it is filled in). Used by the API, the CLI and the server alike."""
        if negative_prompt is not None and self.guidance == 1.0:
            raise InputError(
                "a negative prompt only acts through guidance: set guidance != 1",
                "negative_prompt",
            )

    def with_defaults(self, recommended: dict | None = None) -> GenerateConfig:
        """These settings with each None the caller left filled in: from a bundle's
        ``recommended`` settings when it names a sampler, else from :data:`FALLBACK` (a
        recommended guidance alone still counts). Steps, eta and spacing come from there only
        for the sampler they were recommended for; another sampler keeps its own defaults."""
        rec = dict(recommended or {})
        if not rec.get("sampler"):
            rec = {**FALLBACK, **({"guidance": rec["guidance"]} if "guidance" in rec else {})}
        sampler = self.sampler or rec["sampler"]
        mine = rec if rec["sampler"] == sampler else {}
        filled = {
            k: getattr(self, k) if getattr(self, k) is not None else mine.get(k)
            for k in ("steps", "eta", "spacing")
        }
        guidance = self.guidance if self.guidance is not None else rec.get("guidance")
        if guidance is None:
            guidance = FALLBACK["guidance"]
        return replace(self, sampler=sampler, guidance=float(guidance), **filled)

    def resolve(
        self,
        bundle: Bundle,
        negative_prompt: str | None = None,
        *,
        init_image: bool = False,
        mask: bool = False,
        unet_precision: str | None = None,
    ):
        """The one place a request's settings are completed, for ``bundle``: checked
        (:meth:`validate`); each None filled in from the bundle's recommended settings
        (:meth:`with_defaults`); ``size`` checked against the sizes the bundle gives (None
        when it is the image's own); the negative-prompt rule checked with the guidance the
        run will use; the sampler's own defaults (steps, eta, spacing) filled in. Returns
        (these settings resolved, the sampler they make). Reads the manifest only: the CLI
        sizes its output with it before any graph is loaded; ``Generator.prepare`` calls it
        for every request. ``unet_precision``: the U-Net that will run; a distilled one
        brings its own recommended settings and rules (:func:`check_distilled`)."""
        self.validate()
        self.check_inputs(init_image, mask)
        # what the caller left to the model
        cfg = self.with_defaults(bundle.recommended_for(unet_precision))
        if init_image and cfg.strength is None:
            cfg = replace(cfg, strength=DEFAULT_STRENGTH)
        if cfg.size is not None:  # one the bundle gives; the image's own is the default
            shape = bundle.output_shape(cfg.size)
            cfg = replace(cfg, size=None if shape == bundle.image_shape else cfg.size)
        cfg.check_negative_prompt(negative_prompt)
        schedule = NoiseSchedule(bundle.schedule)
        sampler = cfg.make_sampler(schedule)  # made (and checked) once per request
        cfg = cfg.resolved(schedule)
        precision = unet_precision or "fp32"  # the Generator's default U-Net
        distilled = bundle.distillation(precision)
        if distilled:
            check_distilled(cfg, sampler, distilled, negative_prompt, precision)
        return cfg, sampler

    def make_sampler(self, schedule: NoiseSchedule) -> Sampler:
        """The sampler these settings ask for (the one place one is made from settings)."""
        return make_sampler(self.sampler, schedule, self.steps, self.eta, self.spacing)

    def resolved(self, schedule: NoiseSchedule) -> GenerateConfig:
        """These settings with the sampler's defaults filled in (steps, eta, spacing), as
        a run uses them and provenance records them."""
        steps, eta, spacing = resolve_settings(
            self.sampler, schedule, self.steps, self.eta, self.spacing
        )
        return replace(self, steps=steps, eta=eta, spacing=spacing)


class DistillationWarning(UserWarning):
    """Settings a distilled U-Net was not distilled for: allowed, but off its training."""


def check_distilled(
    cfg: GenerateConfig, sampler: Sampler, distilled: dict, negative_prompt, precision: str
) -> None:
    """A distilled U-Net's rules (issue 29; docs/bundle-format.md). A guidance-distilled
    graph makes no unconditional pass, so a negative prompt (which replaces that pass's
    null context) is refused. A guidance scale outside the distilled range, or steps other
    than the timesteps a step-distilled graph learned (another sampler, count or spacing;
    eta is free), are allowed (the graph still runs) but warn, once per distinct message
    (:class:`DistillationWarning`)."""
    import warnings

    guidance = distilled.get("guidance")
    if guidance and negative_prompt is not None:
        raise InputError(
            f"a negative prompt needs the unconditional pass, which the guidance-distilled "
            f"U-Net ({precision}) does not make: choose a U-Net that is not distilled",
            "negative_prompt",
        )
    if guidance and not guidance["w_min"] <= cfg.guidance <= guidance["w_max"]:
        warnings.warn(
            f"guidance {cfg.guidance:g} is outside the {guidance['w_min']:g}-"
            f"{guidance['w_max']:g} the {precision} U-Net was distilled for",
            DistillationWarning,
            stacklevel=2,  # resolve(): one place, so the message shows once
        )
    steps = distilled.get("steps")
    if not steps:
        return
    # eta is free: the student's x̂0 is learnt at these timesteps whatever noise a step adds
    # back (on the shipped student eta 1 judged better than the distilled eta 0: its card)
    ts = [int(t) for t in sampler.timesteps]
    if cfg.sampler != steps["sampler"] or ts != list(steps["timesteps"]):
        warnings.warn(
            f"the {precision} U-Net was distilled for {steps['sampler']} at "
            f"{len(steps['timesteps'])} steps {list(steps['timesteps'])}, not {cfg.sampler} at "
            f"{len(ts)} steps: expect a worse picture",
            DistillationWarning,
            stacklevel=2,  # resolve(): one place, so the message shows once
        )


# The settings for a bundle that recommends none: the rule in
# ddpm_rt.training.evaluate.choose_default (the cheapest setting within one standard error of
# the best on held-out recognition@5, Fréchet within 1.1x of DDPM-500) applied to the
# 16x16 model's evaluation grid: DDIM, 8 steps, eta 1, guidance 2 (its MODEL_CARD.md).
# Steps are the sampler's own default (DEFAULT_STEPS: ddim 8), clamped to a bundle's T.
FALLBACK = {"sampler": _FB_SAMPLER, "eta": _FB_ETA, "guidance": _FB_GUIDANCE}
# The request's schema: field name -> its Setting, in the dataclass's order.
SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in fields(GenerateConfig)}


def cpus_available() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset
    narrow; os.cpu_count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def check_threads(threads) -> int | None:
    """ONNX Runtime's intra-op threads: None (its default) or 1 to :func:`cpus_available`.
    More threads than CPUs only contend, and each one reserves a stack: ``--threads 256``
    under a memory limit once deadlocked ONNX Runtime's thread pool, silently and deaf to
    SIGTERM."""
    if threads is None:
        return None
    n = cpus_available()
    if not _is_int(threads):
        raise InputError(f"threads must be an integer, got {type(threads).__name__}")
    if not 1 <= threads <= n:
        raise InputError(
            f"threads must be between 1 and {n} (the CPUs this process may use), got {threads}"
        )
    return int(threads)


def memory_limit() -> int:
    """Bytes one generation may plan to use: half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small device
        return 2 * 2**30


def estimate_bytes(
    cfg: GenerateConfig,
    image_shape: tuple[int, int, int],
    prompts: int = 1,
    frames: int = 0,
    scale: int = 1,
    gif: bool = False,
    sample: tuple[int, int, int] | None = None,
) -> int:
    """What a call will allocate, roughly: the uint8 results plus, for the rows of one U-Net
    call, x_t, eps, noise and their copies, and the U-Net's activations (about 64 image-sized
    float32 tensors per row at this project's widths); plus ``frames`` kept x̂0 previews
    (``--trajectory``, ``--preview-every``), each a uint8 copy of every image, and their
    grids upscaled by ``scale``: one at a time for preview PNGs, all at once (as RGB and as
    palette images) for a ``gif``. ``sample``: what the U-Net samples when it is not the
    image (a latent bundle's latent shape); the decoder's activations are counted like the
    U-Net's, per image pixel."""
    c, h, w = image_shape
    sc, sh, sw = sample or image_shape
    total = cfg.num * prompts
    rows = min(cfg.batch_size, total) * (1 if cfg.guidance == 1.0 else 2)
    ncols = math.isqrt(total - 1) + 1  # a square-ish grid, as images.grid_size lays it out
    grid = (-(-total // ncols) * (h + 1) + 1) * (ncols * (w + 1) + 1) * scale * scale
    grids = (frames if gif else min(frames, 1)) * grid * (c + 1)
    unet = rows * sc * sh * sw * 4 * (8 + 64)
    decoder = 0 if sample is None else min(cfg.batch_size, total) * c * h * w * 4 * 64
    return total * h * w * c + unet + decoder + frames * total * h * w * c + grids


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(what: str, need: int) -> None:
    limit = memory_limit()
    if need > limit:
        raise InputError(
            f"{what} needs about {_size(need)}, over the limit of {_size(limit)} "
            "(half of this machine's memory)"
        )
