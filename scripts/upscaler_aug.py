"""Choose the cascade decoder's conditioning-augmentation level on the base model's samples.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/upscaler_aug.py runs/upscaler-all \\
        --data runs/everyday16/emoji.npz --detail-data runs/emoji64/emoji.npz \\
        --levels 0,0.05,0.1,0.2 --json runs/upscaler-aug.json

The 16x16 model's samples (its recommended setting, one per concept and prompt set: the
training names, held-out templates and free paraphrases of ``ddpm-rt eval``) are drawn
once; each level's decoder (the torch module the bundle's graph is traced from) upscales
them, and the Fréchet distance at 64x64 in the detail judge's features is reported beside
bicubic upscaling's (the ratio is ``ddpm-rt eval --baseline``'s ``detail_ratio``). Lower is
better; the level with the lowest mean ratio is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ddpm_rt import Generator
from ddpm_rt.training.detail import DetailReference, load_npz, to_size
from ddpm_rt.training.evaluate import parse_setting, recommended_setting
from ddpm_rt.training.upscaler import ExportedUpscaler, load_upscaler


def prompt_sets(data: str) -> dict[str, list[str]]:
    d = load_npz(data, ("label_names", "heldout"))
    sets = {
        "train_captions": [str(n) for n in d["label_names"]],
        "heldout_paraphrases": [str(h).split("\n")[0] for h in d["heldout"]],
    }
    if "paraphrases" in d:
        sets["free_paraphrases"] = [str(p).split("\n")[0] for p in d["paraphrases"] if str(p)]
    return sets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("upscaler", help="checkpoint folder from 'ddpm-rt train-upscaler'")
    ap.add_argument("--base", default="models/default", help="the 16x16 bundle, or a cascade")
    ap.add_argument("--data", required=True, help="the 16x16 emoji.npz (prompt sets)")
    ap.add_argument("--detail-data", required=True, help="the 64x64 emoji.npz (detail judge)")
    ap.add_argument("--levels", default="0,0.05,0.1,0.2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()

    levels = [float(v) for v in args.levels.split(",")]
    gen = Generator(args.base)
    parsed = parse_setting(recommended_setting(args.base))
    kw = {k: v for k, v in parsed["kw"].items() if v is not None}
    g = parsed["guidance"] if parsed["guidance"] is not None else 1.0
    detail = DetailReference(args.detail_data, seed=args.seed)
    model, meta = load_upscaler(args.upscaler)
    samples = {}
    for kind, prompts in prompt_sets(args.data).items():
        ctx = np.stack([gen.context(p) for p in prompts])
        samples[kind] = gen.generate(  # a cascade's own base pictures: the same U-Net's
            context=ctx,
            num=len(ctx),
            seed=args.seed,
            guidance=g,
            batch_size=64,
            **kw,
            **({"size": gen.bundle.base_shape[1]} if gen.bundle.base_shape else {}),
        )
        print(f"{kind}: {len(ctx)} base samples", file=sys.stderr)
    table = {"upscaler": args.upscaler, "step": meta.get("step"), "setting": parsed, "rows": {}}
    for kind, small in samples.items():
        table["rows"].setdefault("bicubic", {})[kind] = detail.frechet(to_size(small, 64))
    for level in levels:
        dec = ExportedUpscaler(model, level).eval()
        row = {}
        for kind, small in samples.items():
            x = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.no_grad():
                y = torch.cat([dec(b) for b in x.split(128)])
            big = np.rint((y.clamp(-1, 1).numpy() + 1) * 127.5).astype(np.uint8)
            big = big.transpose(0, 2, 3, 1)
            fd = detail.frechet(big)
            row[kind] = fd
            row[f"{kind}_ratio"] = fd / table["rows"]["bicubic"][kind]
            back = to_size(big, 16).astype(np.float64)  # box: the projection's promise
            row[f"{kind}_box_max_levels"] = float(np.abs(back - small).max())
        row["mean_ratio"] = float(np.mean([row[f"{k}_ratio"] for k in samples]))
        table["rows"][f"aug {level:g}"] = row
        print(f"aug {level:g}: " + json.dumps({k: round(v, 4) for k, v in row.items()}))
    best = min(levels, key=lambda v: table["rows"][f"aug {v:g}"]["mean_ratio"])
    table["best"] = best
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    print(f"best level: {best:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
