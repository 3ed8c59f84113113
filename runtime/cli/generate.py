"""``ddpm-rt generate|info|bench``: the commands that run on the runtime alone (no torch).

Every argument and output path is validated before any model is loaded: the manifest is
read (cheap) to size the output, then the graphs are loaded and checked, then the work runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import stat
import sys
import time
from pathlib import Path

from ddpm_rt.bundle.manifest import DECODER_PRECISIONS, UNET_PRECISIONS
from ddpm_rt.config import SETTINGS, GenerateConfig
from ddpm_rt.errors import InputError

_DIGEST = re.compile(r"[0-9a-f]{64}")
SECTIONS = ("unet", "e2e", "overhead", "cold", "text")


def default_model() -> Path:
    """The bundle shipped in models/ (checked out or installed as package data)."""
    package = Path(__file__).resolve().parent.parent  # runtime/ (ddpm_rt)
    for cand in (package.parent / "models" / "default", package / "models" / "default"):
        # a source checkout (editable install), then an installed wheel's package data
        if (cand / "manifest.json").is_file():
            return cand
    raise InputError("no default model is installed; pass --model BUNDLE")


def bundle_arg(value: str | None, flag: str) -> Path:
    """The bundle a flag names: absent means the shipped model; an empty name is refused (it
    once meant the shipped model too, silently)."""
    if value is None:
        return default_model()
    if not value.strip():
        raise InputError(
            f"{flag} is empty: name a bundle folder, or leave it out for the shipped model"
        )
    return Path(value)


def fields_of(cls, args: argparse.Namespace, **extra) -> dict:
    """CLI flags map one to one onto dataclass fields (dashes for underscores)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    kw.update(extra)
    return kw


def _digest(args: argparse.Namespace) -> str | None:
    d = getattr(args, "expect_digest", None)
    if d is not None and not _DIGEST.fullmatch(d.lower()):
        raise InputError("--expect-digest must be 64 hex digits (the sha256 ddpm-rt info prints)")
    return None if d is None else d.lower()


def _providers(args: argparse.Namespace) -> list[str] | None:
    if not args.providers:
        return None
    providers = [p.strip() for p in args.providers.split(",")]
    if not all(providers):
        raise InputError(f"--providers has an empty name: {args.providers!r}")
    return providers


class _Outputs:
    """What ``generate`` writes: the PNG (a grid of several), the x̂0 grid every
    ``--preview-every`` steps (OUT.stepK.png) and the ``--trajectory`` GIF. Paths are
    checked before anything loads; the frames are collected by :meth:`after_step` as the
    run goes, and everything is written by :meth:`write` once it has ended."""

    def __init__(self, args: argparse.Namespace):
        from ddpm_rt.bundle.fileio import check_writable
        from ddpm_rt.images import check_png

        self.out, self.force, self.scale = Path(args.out), args.force, args.scale
        if self.out.suffix.lower() != ".png":
            raise InputError(f"--out must be a .png file, got {self.out}")
        check_writable(self.out, force=self.force)
        check_png(1, 1, 1, self.scale)  # the scale's range; the size once the shape is known
        if args.preview_every is not None and args.preview_every < 1:
            raise InputError(f"--preview-every must be >= 1, got {args.preview_every}")
        self.preview_every = args.preview_every or 0
        self.trajectory = Path(args.trajectory) if args.trajectory else None
        if self.trajectory is not None:
            if self.trajectory.suffix.lower() != ".gif":
                raise InputError(f"--trajectory must be a .gif file, got {self.trajectory}")
            check_writable(self.trajectory, force=self.force)
        # x̂0 of every image every `every` steps of a chunk: every step's for --trajectory
        self.every = 1 if self.trajectory is not None else self.preview_every
        self.frames: dict = {}  # step within a chunk -> x̂0 of every image

    def _step_png(self, k: int) -> Path:
        return self.out.with_name(f"{self.out.stem}.step{k:04d}.png")

    def plan(self, images: int, shape: tuple[int, int, int], ncols, steps: int) -> int:
        """Check the files a run of ``steps`` steps (those it takes) will write, ``images``
        pictures of ``shape``; returns the x̂0 grids it keeps until the end."""
        from ddpm_rt.bundle.fileio import check_writable
        from ddpm_rt.images import check_png

        self.images, self.shape, self.ncols = images, shape, ncols
        if self.preview_every:
            for k in range(self.preview_every, steps + 1, self.preview_every):
                check_writable(self._step_png(k), force=self.force)
        check_png(images, shape[1], shape[2], self.scale, ncols)
        if self.trajectory is not None:
            if steps == 0:
                raise InputError("--trajectory needs a sampling step; strength 0 takes none")
            return steps
        return steps // self.preview_every if self.preview_every else 0

    def after_step(self, info) -> None:
        """The run's step callback: stops on a received signal; keeps the frames."""
        import numpy as np

        from ddpm_rt.cli import raise_if_signalled

        raise_if_signalled()  # a signal whose exception native code swallowed stops here
        if info.preview is not None and (self.every and info.chunk_step % self.every == 0):
            if info.chunk_step not in self.frames:
                _, h, w = self.shape
                self.frames[info.chunk_step] = np.zeros((self.images, h, w, 3), np.uint8)
            rows = slice(info.first_image, info.first_image + info.images)
            self.frames[info.chunk_step][rows] = info.preview

    def write(self, images, provenance: dict) -> None:
        from ddpm_rt.images import save_gif, save_png

        save_png(self.out, images, scale=self.scale, ncols=self.ncols, provenance=provenance)
        for k in sorted(self.frames):
            if self.preview_every and k % self.preview_every == 0:
                save_png(self._step_png(k), self.frames[k], self.scale, self.ncols)
        if self.trajectory is not None:
            frames = [self.frames[k] for k in sorted(self.frames)]
            save_gif(self.trajectory, frames, self.scale, self.ncols)


def _unet_variant(args) -> str | None:
    """The bundle's U-Net variant that will run (as ``Generator.unet_variant``): on
    TensorRT, ``int8`` names the Q/DQ graph's."""
    if args.backend != "trt" or args.unet_precision is None:
        return args.unet_precision
    from ddpm_rt.backends.trt_build import trt_variant

    return trt_variant(args.unet_precision)


def _prompts_of(args: argparse.Namespace) -> list[str]:
    from ddpm_rt.text import check_prompt

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += _read_prompts(Path(args.prompts))
    if not prompts:
        raise InputError("give --prompt TEXT (repeatable) or --prompts FILE")
    for p in prompts:
        check_prompt(p, "--prompt")
    if args.negative_prompt is not None:
        check_prompt(args.negative_prompt, "--negative-prompt")
    return prompts


def _inputs_of(args: argparse.Namespace, bundle) -> dict:
    """``--init-image`` and ``--mask`` read as the model's picture size (arrays: what
    ``Generator.prepare`` reads them as, so the files are refused before any graph loads)."""
    from ddpm_rt.images import load_mask, load_picture

    if not args.init_image:
        return {}
    _, h, w = bundle.image_shape
    inputs = {"init_image": load_picture(args.init_image, h, w, "--init-image")}
    if args.mask:
        inputs["mask"] = load_mask(args.mask, h, w, "--mask")
    return inputs


def cmd_generate(args: argparse.Namespace) -> int:
    """Arguments and output paths first; then the manifest (cheap) resolves the settings
    and sizes the output; then the graphs load and the work runs."""
    from ddpm_rt.bundle.bundle import Bundle
    from ddpm_rt.config import check_memory, check_threads, estimate_bytes
    from ddpm_rt.generator import Generator

    # 1. Arguments and the output paths, before anything is loaded.
    model = bundle_arg(args.model, "--model")
    check_threads(args.threads)
    cfg = GenerateConfig(**fields_of(GenerateConfig, args))
    cfg.validate()
    prompts = _prompts_of(args)
    cfg.check_negative_prompt(args.negative_prompt)  # a given guidance: before any load
    outputs = _Outputs(args)
    digest, providers = _digest(args), _providers(args)
    # 2. The manifest (validated, no graph loaded yet): the settings as the run will use
    # them (GenerateConfig.resolve, as Generator.prepare does), which size the output.
    bundle = Bundle.load(model, hash_all=False, expected_digest=digest)
    resolved, sampler = cfg.resolve(
        bundle,
        args.negative_prompt,
        init_image=bool(args.init_image),
        mask=bool(args.mask),
        unet_precision=_unet_variant(args),
    )
    inputs = _inputs_of(args, bundle)  # the pictures read and checked, before any graph
    shape = bundle.output_shape(resolved.size)
    ncols = cfg.num if len(prompts) > 1 else None  # one grid row per prompt
    n = len(sampler.timesteps)
    steps = n - (resolved.start_step(n) if inputs else 0)  # image-to-image starts part-way
    frames = outputs.plan(cfg.num * len(prompts), shape, ncols, steps)
    what = f"{len(prompts)} x --num {cfg.num}"
    if outputs.trajectory is not None:
        what += f" with a {frames}-frame --trajectory"
    gif = outputs.trajectory is not None
    need = estimate_bytes(
        resolved, shape, len(prompts), frames, args.scale, gif=gif, sample=bundle.sample_shape
    )
    check_memory(what, need)
    # 3. The graphs, checked against the bundle; then the work.
    gen = Generator(
        bundle,
        backend=args.backend,
        providers=providers,
        text_precision=args.text_precision,
        threads=args.threads,
        unet_precision=args.unet_precision,
        engine_cache=args.engine_cache,
        decoder_precision=args.decoder_precision,
    )
    t0 = time.perf_counter()
    job = gen.prepare(
        prompts if len(prompts) > 1 else prompts[0],
        negative_prompt=args.negative_prompt,
        config=cfg,
        callback=outputs.after_step,
        preview_every=outputs.every,
        **inputs,
    )
    bar = not args.no_progress and sys.stderr.isatty()  # a progress bar only for a person
    images = gen.run(job, progress=bar)
    outputs.write(images, gen.provenance(job))  # the settings as the run resolved them
    print(
        f"wrote {outputs.out} ({len(images)} image{'s' * (len(images) > 1)}, "
        f"{time.perf_counter() - t0:.1f} s)",
        file=sys.stderr,
    )
    return 0


MAX_PROMPTS = 1000
MAX_PROMPTS_BYTES = 1 << 20


def _read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file.

    Only a regular file is read (a FIFO would block, a device like /dev/zero never ends),
    and never more than :data:`MAX_PROMPTS_BYTES` + 1 bytes, whatever its size claims (files
    under /proc report size 0). O_NONBLOCK: opening a FIFO to check it must not wait for a
    writer; it changes nothing for a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"--prompts file not found: {path}") from None
    except OSError as e:
        raise InputError(f"cannot read --prompts file {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"--prompts {path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_PROMPTS_BYTES + 1)
    except OSError as e:
        raise InputError(f"cannot read --prompts file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PROMPTS_BYTES:
        raise InputError(f"--prompts file {path} is over 1 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--prompts file {path} is not UTF-8 text") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise InputError(f"--prompts file {path} must hold 1-{MAX_PROMPTS} non-empty lines")
    return prompts


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a bundle after validating it as strictly as generation does (and more: every
    file is hashed and every graph loaded and checked) -- or, given a PNG this command
    wrote, the settings that made it."""
    from ddpm_rt.bundle.bundle import Bundle
    from ddpm_rt.generator import Generator

    if args.bundle and Path(args.bundle).suffix.lower() == ".png" and Path(args.bundle).is_file():
        from ddpm_rt.images import read_provenance

        print(json.dumps(read_provenance(Path(args.bundle)), indent=2))
        return 0

    b = Bundle.load(
        bundle_arg(args.bundle, "the bundle"), hash_all=True, expected_digest=_digest(args)
    )
    gen = Generator(b)
    for g in b.graphs:
        gen.backend.session(g)
    m = b.manifest
    c, h, w = b.image_shape
    lines = [
        f"bundle      {b.path}",
        f"digest      {b.digest}  (sha256 of manifest.json; pins every file)",
        f"image       {c}x{h}x{w}",
    ]
    if b.base_shape is not None:
        lc, lh, lw = b.base_shape
        lines.append(
            f"cascade     the U-Net draws {lc}x{lh}x{lw} pictures, a super-resolution decoder "
            f"makes them {h}x{w} ({', '.join(f'{p}: {g}' for p, g in b.decoder_precisions.items())}"
            f"); sizes {', '.join(map(str, b.sizes))} (--size)"
        )
    elif b.latent:
        lc, lh, lw = b.sample_shape
        lines.append(
            f"latent      {lc}x{lh}x{lw} (scale factor {b.latent['scale_factor']:.4g}), decoded "
            f"by {', '.join(f'{p}: {g}' for p, g in b.decoder_precisions.items())}"
        )
    lines += [
        f"schedule    {m['schedule']}",
        f"conditioning {b.conditioning['kind']} (context dim {b.context_dim})",
    ]
    if b.label_names:
        lines.append(f"labels      {', '.join(b.label_names)}")
    for name, g in b.graphs.items():
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in g.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in g.outputs)
        lines.append(f"graph       {name}: {g.file} ({ins}) -> ({outs})")
    lines.append(f"producer    {json.dumps(m.get('producer', {}))}")
    lines.append("checks      manifest schema, file sizes and sha256, graph I/O: all passed")
    print("\n".join(lines))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ddpm_rt.bundle.bundle import Bundle
    from ddpm_rt.bundle.fileio import atomic_write, check_writable
    from ddpm_rt.config import MAX_BATCH_SIZE, check_int
    from ddpm_rt.generator import Generator
    from ddpm_rt.tools.bench import format_bench, run_bench

    model = bundle_arg(args.bundle, "the bundle")
    try:
        sizes = tuple(int(s) for s in args.batch_sizes.split(","))
    except ValueError:
        raise InputError(
            f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}"
        ) from None
    for s in sizes:
        check_int("--batch-sizes entry", s, 1, MAX_BATCH_SIZE)
    check_int("--repeats", args.repeats, 1, 10_000)
    sections = tuple(x.strip() for x in args.sections.split(","))
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        raise InputError(
            f"unknown --sections {', '.join(bad)} (choose from: {', '.join(SECTIONS)})"
        )
    if args.checkpoint and not (Path(args.checkpoint) / "model.safetensors").is_file():
        raise InputError(f"--checkpoint {args.checkpoint} is not a checkpoint folder")
    if args.compare:
        Bundle.load(args.compare, hash_all=False)  # a bad bundle is refused before any work
    if args.json:
        check_writable(Path(args.json), force=args.force)
    gen = Generator(
        model,
        providers=_providers(args),
        expected_digest=_digest(args),
        threads=args.threads,
    )
    result = run_bench(
        gen,
        sizes,
        args.repeats,
        args.checkpoint,
        sections,
        not args.no_compile,
        compare=args.compare,
    )
    print(format_bench(result))
    if args.json:
        atomic_write(Path(args.json), lambda f: f.write(json.dumps(result, indent=2).encode()))
    return 0


def add_model_flags(p) -> None:
    """How a command that loads a model loads it (generate, serve): precisions, backend,
    engine cache, providers, threads, the expected digest."""
    p.add_argument(
        "--text-precision",
        choices=["fp32", "int8"],
        help="text encoder precision (default: the bundle's)",
    )
    p.add_argument(
        "--unet-precision",
        choices=list(UNET_PRECISIONS),
        help="U-Net precision, if the bundle has it (default: see the model card)",
    )
    p.add_argument(
        "--decoder-precision",
        choices=list(DECODER_PRECISIONS),
        help="a latent bundle's decoder precision, if the bundle has it (default: the bundle's)",
    )
    p.add_argument(
        "--backend",
        default="ort",
        choices=["ort", "trt"],
        help="ort: ONNX Runtime (--providers); trt: TensorRT engines from build-engines",
    )
    p.add_argument("--engine-cache", help="TensorRT engine cache folder (default: per-user)")
    p.add_argument("--providers", help="ONNX Runtime providers, comma-separated")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: physical cores)")
    p.add_argument("--expect-digest", help="refuse the bundle unless its digest is this sha256")


def add_setting_flags(p, defaults: dict | None = None) -> None:
    """One flag per request setting (:data:`ddpm_rt.config.SETTINGS`: ``--batch-size`` for
    ``batch_size``), with its type, choices and help; left out, the field's own default, or
    the command's own from ``defaults`` (its help says so)."""
    for name, setting in SETTINGS.items():
        kw: dict = {"help": setting.help}
        if name in (defaults or {}):
            kw["default"] = defaults[name]
            kw["help"] = re.sub(r"default [0-9.]+", f"default {defaults[name]:g}", setting.help)
        if setting.kind == "choice":
            kw["choices"] = list(setting.choices)
        else:
            kw["type"] = int if setting.kind == "int" else float
        p.add_argument("--" + name.replace("_", "-"), **kw)


def _add_run_flags(p, defaults: dict | None = None, out: str = "out.png") -> None:
    """generate's (and variations') flags after the prompt and the pictures: the request
    settings, the outputs, how the model loads."""
    add_setting_flags(p, defaults)
    p.add_argument("--out", default=out, help="PNG to write; several images form a grid")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--trajectory", help="also write the denoising (x̂0 at every step) as a GIF")
    p.add_argument(
        "--preview-every", type=int, help="also save the x̂0 grid every K steps (OUT.stepK.png)"
    )
    p.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscale of the PNG")
    add_model_flags(p)
    p.add_argument("--no-progress", action="store_true")


# ``ddpm-rt variations``: generate's settings it changes (several seeds, half redrawn).
VARIATIONS = {"num": 4, "strength": 0.5}


def cmd_variations(args: argparse.Namespace) -> int:
    """``ddpm-rt variations IMAGE``: ``generate --init-image IMAGE`` at
    :data:`VARIATIONS`' settings; without ``--prompt``, the prompt IMAGE's ddpm-rt settings
    record (a PNG this command or generate wrote)."""
    if args.prompt is None:
        from ddpm_rt.images import read_provenance

        try:
            prompts = read_provenance(args.image).get("prompts")
        except InputError:
            prompts = None
        if not isinstance(prompts, list) or len(prompts) != 1 or not isinstance(prompts[0], str):
            raise InputError(
                f"give --prompt: {args.image} records no single ddpm-rt prompt to reuse"
            )
        args.prompt = prompts[0]
    args.prompt, args.init_image = [args.prompt], args.image
    return cmd_generate(args)


def add_generate_parsers(sub, common) -> None:
    g = sub.add_parser("generate", help="generate images from a prompt (default command)")
    g.add_argument(
        "--prompt",
        action="append",
        help="what to draw ('' = unconditional); repeat for one grid row per prompt",
    )
    g.add_argument("--prompts", help="a UTF-8 file with one prompt per line (one row each)")
    g.add_argument("--negative-prompt", help="what to steer away from (needs --guidance != 1)")
    g.add_argument("--model", help="bundle folder (default: the shipped model)")
    g.add_argument(
        "--init-image",
        help="start from this picture (PNG, JPEG or WebP; any size, resized to the model's): "
        "image-to-image, with --strength",
    )
    g.add_argument(
        "--mask",
        help="with --init-image: repaint where this picture is light (grey >= 128 of 255), "
        "keep the rest exactly",
    )
    _add_run_flags(g)
    common(g)
    g.set_defaults(func=cmd_generate)
    _add_info_parser(sub, common)
    _add_bench_parser(sub, common)
    _add_variations_parser(sub, common)


def _add_variations_parser(sub, common) -> None:
    v = sub.add_parser(
        "variations",
        help="several seeds of image-to-image from one picture (generate --init-image, "
        f"--num {VARIATIONS['num']}, --strength {VARIATIONS['strength']:g})",
    )
    v.add_argument("image", help="the picture (PNG, JPEG or WebP; any size)")
    v.add_argument(
        "--prompt",
        help="what to draw (default: the prompt in IMAGE's ddpm-rt settings, if it has them)",
    )
    v.add_argument("--negative-prompt", help="what to steer away from (needs --guidance != 1)")
    v.add_argument("--model", help="bundle folder (default: the shipped model)")
    _add_run_flags(v, VARIATIONS, out="variations.png")
    common(v)
    v.set_defaults(func=cmd_variations, prompts=None, mask=None)


def _add_info_parser(sub, common) -> None:
    i = sub.add_parser(
        "info", help="validate and describe a bundle (prints its digest), or a PNG's settings"
    )
    i.add_argument(
        "bundle", nargs="?", help="bundle folder (default: the shipped model), or a PNG it made"
    )
    i.add_argument("--expect-digest", help="refuse the bundle unless its digest is this sha256")
    common(i)
    i.set_defaults(func=cmd_info)


def _add_bench_parser(sub, common) -> None:
    bn = sub.add_parser("bench", help="U-Net latency per step and generation time")
    bn.add_argument("bundle", nargs="?", help="bundle folder (default: the shipped model)")
    bn.add_argument("--batch-sizes", default="1,8,32")
    bn.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"what to measure (default all: {','.join(SECTIONS)})",
    )
    bn.add_argument("--checkpoint", help="torch rows: load weights from this checkpoint")
    bn.add_argument(
        "--compare", help="another bundle: time its fp32 U-Net in the same run, report the ratio"
    )
    bn.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    bn.add_argument("--threads", type=int, help="ONNX Runtime threads")
    bn.add_argument("--repeats", type=int, default=30)
    bn.add_argument("--providers", help="ONNX Runtime providers, comma-separated")
    bn.add_argument("--json", help="also write the figures to this JSON file")
    bn.add_argument("--force", action="store_true", help="replace --json if it exists")
    bn.add_argument("--expect-digest", help="refuse the bundle unless its digest is this sha256")
    common(bn)
    bn.set_defaults(func=cmd_bench)
