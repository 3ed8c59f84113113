"""``ddpm-rt eval BUNDLE --data emoji.npz``: does the model draw what it is asked for?

1. Train the judge (:mod:`.judge`) on all but one art style and report its accuracy on the
   held-out style (is it a fair judge of unseen drawings?), then train it on every style.
2. For each sampler setting, generate ``per_concept`` images per emoji from (a) a training
   caption (the emoji's name) and (b) held-out paraphrases never seen in training, through
   the runtime ``Generator`` exactly as a user would.
3. Report recognition@1/@5 (the prompted emoji among the judge's top 1/5) and the Fréchet
   distance between judge features of generated and real images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ddpm_rt.errors import InputError
from ddpm_rt.fileio import atomic_write
from ddpm_rt.pipeline import Generator

from .judge import frechet_distance, judge_outputs, topk_hits, train_judge

DEFAULT_SETTINGS: tuple[str, ...] = ("ddpm", "ddim:50", "ddim:25")


def _load(data: Path) -> dict:
    try:
        with np.load(data, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {data}: {e}") from None
    for k in ("images", "labels", "label_names", "styles", "heldout"):
        if k not in d:
            raise InputError(f"{data} lacks {k!r}: build it with 'ddpm-rt data emoji'")
    return d


def evaluate(
    bundle: str | Path,
    data: str | Path,
    settings=DEFAULT_SETTINGS,
    per_concept: int = 4,
    guidance: float = 1.0,
    seed: int = 0,
    holdout_style: str = "twemoji",
    judge_steps: int = 1500,
    log=print,
) -> dict:
    d = _load(Path(data))
    images, labels, names = d["images"], d["labels"], [str(n) for n in d["label_names"]]
    k = len(names)
    report: dict = {
        "bundle": str(bundle),
        "data": str(data),
        "concepts": k,
        "per_concept": per_concept,
        "guidance": guidance,
        "seed": seed,
    }
    torch.manual_seed(seed)
    # (1) The judge, checked on an art style it never saw.
    styles = d["styles"].astype(str)
    if holdout_style in set(styles):
        tr, te = styles != holdout_style, styles == holdout_style
        j = train_judge(images[tr], labels[tr], k, steps=judge_steps, seed=seed)
        logits, _ = judge_outputs(j, images[te])
        report["judge_heldout_style"] = {
            "style": holdout_style,
            "top1": topk_hits(logits, labels[te], 1),
            "top5": topk_hits(logits, labels[te], 5),
        }
        h = report["judge_heldout_style"]
        log(f"judge on unseen style {holdout_style}: top1 {h['top1']:.3f}, top5 {h['top5']:.3f}")
    judge = train_judge(images, labels, k, steps=judge_steps, seed=seed)
    _, real_feats = judge_outputs(judge, images)

    # (2)+(3) Generate and score.
    gen = Generator(bundle)
    heldout = [str(h).split("\n") for h in d["heldout"]]
    report["settings"] = {}
    for setting in settings:
        sampler, _, steps = setting.partition(":")
        steps = int(steps) if steps else None
        row = {}
        for kind in ("train_captions", "heldout_paraphrases"):
            t0 = time.perf_counter()
            prompts, want = [], []
            for c in range(k):
                for i in range(per_concept):
                    h = heldout[c][i % len(heldout[c])]
                    prompts.append(names[c] if kind == "train_captions" else h)
                    want.append(c)
            ctx = np.stack([gen.context(p) for p in prompts])
            gen_imgs = gen.generate(
                context=ctx,
                num=len(ctx),
                sampler=sampler,
                steps=steps,
                seed=seed,
                guidance=guidance,
                batch_size=64,
            )
            want = np.array(want)
            logits, feats = judge_outputs(judge, gen_imgs)
            row[kind] = {
                "top1": topk_hits(logits, want, 1),
                "top5": topk_hits(logits, want, 5),
                "frechet": frechet_distance(feats, real_feats),
                "seconds": time.perf_counter() - t0,
            }
            log(
                f"{setting} {kind}: recognition@1 {row[kind]['top1']:.3f} @5 "
                f"{row[kind]['top5']:.3f}, Fréchet {row[kind]['frechet']:.2f}"
            )
            row[kind]["_images"] = gen_imgs
        report["settings"][setting] = row
    return report


def save_report(report: dict, path: Path) -> None:
    clean = json.loads(json.dumps(report, default=lambda o: None))
    for row in clean.get("settings", {}).values():
        for v in row.values():
            v.pop("_images", None)
    atomic_write(path, lambda f: f.write((json.dumps(clean, indent=2) + "\n").encode()))
