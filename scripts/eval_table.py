"""Print an `ddpm-rt eval --json` report as the model card's markdown table.

python scripts/eval_table.py runs/eval_grid.json
"""

from __future__ import annotations

import json
import sys


def name(row: dict) -> str:
    s = row["sampler"]
    if s == "ddpm":
        label = "DDPM-500"
    elif s == "ddim":
        label = f"DDIM-{row['steps']} eta {row['eta']:g}"
    else:
        label = f"{'DPM++ 2M SDE' if s.endswith('sde') else 'DPM++ 2M'}-{row['steps']}"
    return label + ("" if row["precision"] == "fp32" else f" **{row['precision']}**")


def main(path: str) -> int:
    r = json.load(open(path))
    n = r["concepts"] * r["per_concept"]
    print(
        f"{r['concepts']} concepts x {r['per_concept']} image per prompt set (n = {n}); "
        "standard error of recognition@5 shown as ±."
    )
    print()
    free = any("free_paraphrases" in row for row in r["settings"].values())
    print(
        "| setting | guidance | cost | names @1 | names @5 | Fréchet names "
        "| held-out @1 | held-out @5 | Fréchet held-out |"
        + (" free @1 | free @5 |" if free else "")
    )
    print(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: | ---: |" if free else "")
    )
    default = r.get("default", {}).get("setting")
    for key, row in r["settings"].items():
        tr, ho = row["train_captions"], row["heldout_paraphrases"]
        mark = " ← default" if key == default else ""
        print(
            f"| {name(row)}{mark} | {row['guidance']:g} | {row['cost']} "
            f"| {100 * tr['top1']:.1f} | {100 * tr['top5']:.1f} | {tr['frechet']:.2f} "
            f"| {100 * ho['top1']:.1f} | {100 * ho['top5']:.1f} ± {100 * ho['top5_se']:.1f} "
            f"| {ho['frechet']:.2f} |"
            + (
                f" {100 * row['free_paraphrases']['top1']:.1f} "
                f"| {100 * row['free_paraphrases']['top5']:.1f} ± "
                f"{100 * row['free_paraphrases']['top5_se']:.1f} |"
                if free
                else ""
            )
        )
    if default:
        d = r["default"]
        print()
        print(
            f"Default by the rule: {name(r['settings'][default])}, guidance {d['guidance']:g} "
            f"(cost {d['cost']} U-Net image-evaluations vs {d['reference_cost']} for DDPM-500; "
            f"best fair row {name(r['settings'][d['best']])} at guidance "
            f"{r['settings'][d['best']]['guidance']:g}; held-out @5 floor "
            f"{100 * d['heldout_top5_floor']:.1f} %, Fréchet cap {d['frechet_cap']:.2f})."
            if "best" in d
            else f"held-out @5 floor {100 * d['heldout_top5_floor']:.1f} %, Fréchet cap "
            f"{d['frechet_cap']:.2f})."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
