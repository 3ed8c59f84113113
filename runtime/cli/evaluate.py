"""``ddpm-rt eval`` and ``ddpm-rt eval-autoencoder``: judge-based evaluation (needs torch,
imported lazily like the other training commands)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm_rt.cli import load_stage as _load
from ddpm_rt.cli.generate import default_model
from ddpm_rt.errors import InputError


def cmd_eval(args: argparse.Namespace) -> int:
    ev = _load("ddpm_rt.training.evaluate", "train")
    from ddpm_rt.bundle.fileio import check_writable

    for out in (args.json, args.grid):
        if out:
            check_writable(Path(out), force=args.force)
    if args.img2img:
        return _eval_img2img(ev, args)
    if args.img2img_concepts is not None:
        raise InputError("--img2img-concepts goes with --img2img")
    if args.settings == "full":
        settings = ev.FULL_GRID
    else:
        settings = tuple(s.strip() for s in args.settings.split(","))
    try:
        guidance = tuple(float(g) for g in args.guidance.split(","))
    except ValueError:
        guidance = ()
    if not guidance or not all(0 <= g <= 50 for g in guidance):  # NaN fails here too
        raise InputError(
            f"--guidance must be comma-separated numbers in [0, 50], got {args.guidance!r}"
        )
    if args.no_recognition and (args.write_recommended or not args.detail_data):
        raise InputError("--no-recognition needs --detail-data and no --write-recommended")
    if args.baseline and not args.detail_data:
        raise InputError("--baseline is measured at 64x64: add --detail-data (the 64x64 renders)")
    has_ref = "ddpm@g1" in settings or ("ddpm" in settings and 1.0 in guidance)
    variant = args.write_recommended not in (None, "fp32")  # a U-Net variant's own settings
    if variant:  # refused before the evaluation, not after it
        from ddpm_rt.bundle.bundle import Bundle

        p = args.write_recommended
        if p not in Bundle.load(args.bundle or default_model()).unet_precisions:
            raise InputError(f"--write-recommended {p!r:.40}: the bundle has no such U-Net")
        if not any(s.split("@")[1:2] == [p] for s in settings):
            raise InputError(f"--write-recommended {p}: no --settings entry runs it (add @{p})")
    if args.write_recommended and not variant and not has_ref:
        raise InputError("--write-recommended needs the rule's reference row: add ddpm@g1")
    report = ev.evaluate(
        args.bundle or default_model(),
        args.data,
        settings,
        args.per_concept,
        guidance,
        args.seed,
        log=lambda s: print(s, file=sys.stderr),
        classifier=args.classifier,
        detail_data=args.detail_data,
        baseline=args.baseline,
        recognition=not args.no_recognition,
        judge_steps=args.judge_steps,
        **({"detail_judge_steps": args.detail_judge_steps} if args.detail_judge_steps else {}),
    )
    if args.json:
        ev.save_report(report, Path(args.json))
    if args.write_recommended:
        from ddpm_rt.bundle.bundle import write_recommended

        precision = args.write_recommended if variant else None
        chosen = ev.choose_variant_default(report, precision) if variant else report["default"]
        rec = {k: chosen[k] for k in ("sampler", "steps", "eta", "guidance")}
        digest = write_recommended(args.bundle or default_model(), rec, precision)
        print(f"recommended settings written: {rec}; manifest digest now {digest}")
    if args.grid:
        from ddpm_rt.images import save_png

        first = next(iter(report["settings"].values()))["train_captions"]["_images"]
        save_png(args.grid, first, ncols=args.per_concept * 8, scale=2)
    return 0


def _eval_img2img(ev, args: argparse.Namespace) -> int:
    """``eval --img2img``: variations at 0.3/0.5/0.7 and edits at 0.7, judged (issue 28)."""
    if args.baseline or args.classifier or args.write_recommended or args.grid:
        raise InputError(
            "--img2img takes --data, --detail-data, --img2img-concepts, --judge-steps, --seed, "
            "--json"
        )
    report = ev.evaluate_img2img(
        args.bundle or default_model(),
        args.data,
        renders=args.detail_data,
        seed=args.seed,
        concepts=args.img2img_concepts,
        judge_steps=args.judge_steps,
        log=lambda s: print(s, file=sys.stderr),
    )
    if args.json:
        ev.save_report(report, Path(args.json))
    return 0


def cmd_eval_autoencoder(args: argparse.Namespace) -> int:
    ae = _load("ddpm_rt.training.autoencoder_eval", "train")
    from ddpm_rt.bundle.fileio import check_writable

    if args.json:
        check_writable(Path(args.json), force=args.force)
    report = ae.evaluate_autoencoder(
        args.autoencoder,
        args.data,
        args.judge_data,
        holdout_style=args.holdout_style,
        judge_steps=args.judge_steps,
        recognition=not args.no_recognition,
        per_style=not args.heldout_only,
        log=lambda s: print(s, file=sys.stderr),
        **({"detail_judge_steps": args.detail_judge_steps} if args.detail_judge_steps else {}),
    )
    if args.json:
        from ddpm_rt.training.evaluate import save_report

        save_report(report, Path(args.json))
    return 0


def _add_detail_flags(p) -> None:
    """The 64x64 detail judge's flags, shared by eval and eval-autoencoder."""
    p.add_argument(
        "--no-recognition",
        action="store_true",
        help="skip the 16x16 judges and recognition: only the 64x64 detail figures",
    )
    p.add_argument(
        "--detail-judge-steps", type=int, help="training steps of the 64x64 judge (default 1500)"
    )


def _add_eval_parser(sub, common) -> None:
    """``ddpm-rt eval``: a bundle judged on emoji."""
    ev = sub.add_parser("eval", help="judge-based evaluation of an emoji model")
    ev.add_argument("bundle", nargs="?", help="bundle folder (default: the shipped model)")
    ev.add_argument("--data", required=True, help="emoji.npz from 'ddpm-rt data emoji'")
    ev.add_argument(
        "--settings",
        default="ddpm,ddim:50,ddim:25",
        help="sampler[:steps[:eta]][@precision][@gG] list (@gG: this setting at guidance G "
        "only; 'recommended': the bundle's own; 'recommended@PRECISION': that U-Net's own, "
        "e.g. recommended@distilled), or 'full' for the speed grid "
        "(default ddpm,ddim:50,ddim:25)",
    )
    ev.add_argument(
        "--detail-data",
        help="the 64x64 renders (emoji.npz of 'ddpm-rt data emoji --size 64'): also report the "
        "Fréchet distance at 64x64 in a 64x64 judge's features (smaller images bicubic-upscaled)",
    )
    ev.add_argument(
        "--baseline",
        help="a bundle (the 16x16 model) whose images, from the same prompts/seed/setting and "
        "bicubic-upscaled, give the detail distance to compare with (needs --detail-data)",
    )
    _add_detail_flags(ev)
    ev.add_argument(
        "--img2img",
        action="store_true",
        help="instead: image-to-image from each concept's render (--detail-data's, else "
        "--data's) at the bundle's recommended settings: variations at strength 0.3/0.5/0.7 "
        "(recognition, mean pixel change) and edits towards another concept at 0.7",
    )
    ev.add_argument(
        "--img2img-concepts", type=int, help="with --img2img: a spread subset of N concepts"
    )
    ev.add_argument(
        "--judge-steps",
        type=int,
        help="training steps of the 16x16 judge (default: 1,500, or 10 per concept over 150)",
    )
    ev.add_argument("--per-concept", type=int, default=4)
    ev.add_argument(
        "--classifier",
        action="store_true",
        help="also score the U-Net as a zero-shot classifier (early read of conditioning)",
    )
    ev.add_argument("--guidance", default="1", help="guidance scale(s), comma-separated")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", help="write the report here")
    ev.add_argument("--grid", help="PNG of the first setting's images")
    ev.add_argument("--force", action="store_true", help="replace --json/--grid if they exist")
    ev.add_argument(
        "--write-recommended",
        nargs="?",
        const="fp32",
        metavar="PRECISION",
        help="write the rule's choice into the bundle's manifest as its recommended settings "
        "(needs the ddpm@g1 row; prints the new digest); with a U-Net variant's PRECISION "
        "(distilled): the cheapest of that U-Net's rows within one standard error of its best, "
        "as that U-Net's own",
    )
    common(ev)
    ev.set_defaults(func=cmd_eval)


def _add_eval_autoencoder_parser(sub, common) -> None:
    """``ddpm-rt eval-autoencoder``: an autoencoder's reconstructions judged."""
    ea = sub.add_parser(
        "eval-autoencoder",
        help="PSNR, judged recognition and 64x64 Fréchet floor of an autoencoder's reconstructions",
    )
    ea.add_argument("autoencoder", help="checkpoint folder from 'ddpm-rt train-autoencoder'")
    ea.add_argument("--data", required=True, help="emoji.npz at the autoencoder's size (64)")
    ea.add_argument(
        "--judge-data", required=True, help="the same renders at the judge's size (16x16)"
    )
    ea.add_argument("--holdout-style", default="twemoji", help="the unseen style (twemoji)")
    _add_detail_flags(ea)
    ea.add_argument(
        "--heldout-only",
        action="store_true",
        help="recognition on the held-out style only (one 16x16 judge to train, not two)",
    )
    ea.add_argument(
        "--judge-steps", type=int, help="training steps of the 16x16 judges (default: eval's rule)"
    )
    ea.add_argument("--json", help="write the report here")
    ea.add_argument("--force", action="store_true", help="replace --json if it exists")
    common(ea)
    ea.set_defaults(func=cmd_eval_autoencoder)


def add_eval_parsers(sub, common) -> None:
    _add_eval_parser(sub, common)
    _add_eval_autoencoder_parser(sub, common)
