"""``ddpm-rt build-engines`` and ``ddpm-rt doctor``: the GPU path's commands."""

from __future__ import annotations

import argparse
import sys

from ddpm_rt.errors import InputError


def cmd_build_engines(args: argparse.Namespace) -> int:
    from ddpm_rt.backends.engine_cache import EngineCache

    cache = EngineCache(args.engine_cache) if args.engine_cache else EngineCache()
    if args.clear:
        if args.bundle:
            raise InputError("--clear takes no bundle: it empties the whole engine cache")
        n = cache.clear()
        print(f"removed {n} engine(s) from {cache.root}", file=sys.stderr)
        return 0
    if not args.bundle:
        raise InputError("give a bundle folder (or --clear)")
    from ddpm_rt.backends.trt_build import TRT_PRECISIONS, TRT_UNET_PRECISIONS, build_engines

    precisions = tuple(p.strip() for p in args.unet_precision.split(","))
    bad = [p for p in precisions if p not in TRT_UNET_PRECISIONS]
    if bad or not precisions:
        raise InputError(
            f"--unet-precision takes {', '.join(TRT_UNET_PRECISIONS)} (comma-separated), got {bad}"
        )
    decoders = args.decoder_precision.strip()
    if decoders not in ("default", "all"):
        decoders = () if decoders == "none" else tuple(p.strip() for p in decoders.split(","))
        bad = [p for p in decoders if p not in TRT_PRECISIONS]
        if bad or "" in decoders:
            raise InputError(
                f"--decoder-precision takes default, all, none or {', '.join(TRT_PRECISIONS)} "
                f"(comma-separated), got {args.decoder_precision!r:.40}"
            )
    build_engines(
        args.bundle,
        precisions,
        cache,
        max_images=args.max_batch,
        optimization_level=args.optimization_level,
        workspace_mib=args.workspace_mib,
        force=args.force,
        log=lambda s: print(s, file=sys.stderr),
        decoders=decoders,
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from ddpm_rt.cli.generate import default_model
    from ddpm_rt.tools.doctor import run_doctor

    return run_doctor(
        args.bundle or default_model(), args.engine_cache, build=not args.no_build, log=print
    )


def add_gpu_parsers(sub, common) -> None:
    b = sub.add_parser(
        "build-engines",
        help="build TensorRT engines for a bundle's U-Net (and a latent bundle's decoder) on "
        "this machine (needs ddpm-rt[trt])",
    )
    b.add_argument("bundle", nargs="?", help="bundle folder")
    b.add_argument(
        "--unet-precision",
        default="fp32",
        help="fp32, fp16, int8 (the bundle's Q/DQ graph), or a distilled U-Net's distilled, "
        "distilled-fp16, distilled-int8, comma-separated (default fp32)",
    )
    b.add_argument(
        "--decoder-precision",
        default="default",
        help="a latent bundle's decoder: default (the bundle's default decoder precision), all "
        "(every one TensorRT can build; the others skipped with the reason), none, or fp32, "
        "fp16 (the bundle's fp16 decoder graph), int8 (only a Q/DQ decoder graph), "
        "comma-separated",
    )
    b.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="most images per U-Net call; the U-Net's profile allows twice as many rows "
        "(guidance), the decoder's this many",
    )
    b.add_argument("--optimization-level", type=int, default=3, help="TensorRT's, 0..5")
    b.add_argument("--workspace-mib", type=int, default=1024, help="builder workspace limit")
    b.add_argument("--engine-cache", help="cache folder (default: <user cache>/ddpm-rt/engines)")
    b.add_argument("--force", action="store_true", help="rebuild even if a cached engine matches")
    b.add_argument(
        "--clear",
        action="store_true",
        help="remove every cached engine (only files build-engines wrote; refuses other folders)",
    )
    common(b)
    b.set_defaults(func=cmd_build_engines)

    d = sub.add_parser(
        "doctor", help="which backends and precisions work here, and a check of each that does"
    )
    d.add_argument("bundle", nargs="?", help="bundle folder (default: the shipped model)")
    d.add_argument("--engine-cache", help="TensorRT engine cache folder (default: per-user)")
    d.add_argument("--no-build", action="store_true", help="do not build missing TensorRT engines")
    common(d)
    d.set_defaults(func=cmd_doctor)
