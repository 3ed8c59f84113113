"""``ddpm-rt data emoji``: a captioned emoji data set in several art styles.

Each concept (an emoji) is rendered by every installed style (see :mod:`.emoji_sources`),
alpha-composited on one fixed background and area-downsampled to ``size``. Captions come
from the CLDR name (the ``emoji`` package) plus keyword and template variants; a second set
of paraphrase templates is held out of training for evaluation. Writes, deterministically:

    DIR/images/<style>_<codepoints>.png    DIR/metadata.jsonl (imagefolder: file_name, text)
    DIR/emoji.npz  images (N,H,W,3) uint8, labels (N,) concept index, label_names (K,) names,
                   emoji (K,) characters, styles (N,), captions (N,) "\\n"-joined alternatives,
                   heldout (K,) "\\n"-joined held-out paraphrases per concept,
                   paraphrases (K,) "\\n"-joined free paraphrases ("" for most concepts)
    DIR/ATTRIBUTION.md                     sources, licences, counts
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_rt.bundle.fileio import atomic_write
from ddpm_rt.errors import InputError

from .emoji_sources import LICENCES, gemojione_keywords, open_sources
from .paraphrases import FREE_PARAPHRASES

STYLES = ("openmoji", "noto", "emojione", "twemoji")
BACKGROUND = (255, 255, 255)

# The previous default model's 107 concepts ("classic"); kept to compare models on them.
CLASSIC_CONCEPTS = (
    "🍎🍏🍌🍇🍉🍊🍋🍓🍒🍑🍍🥝🥑🍆🥕🌽🍄🍕🍔🍟🌭🍩🍪🎂🍦🧀🥚🍞"
    "😀😂😍😎😡😢😱😴🤔😉🤢🥶🥵👻💀👽🤖💩🤡😇"
    "🐶🐱🐭🐰🦊🐻🐼🐨🐯🦁🐮🐷🐸🐵🐔🐧🐤🦄🐙🐢🐍🐳🐟🦋🐝🐞"
    "❤💙💚💛💜⭐☀🌙☁🌈⚡🔥❄💧🌵🌲🌻🌹🍀"
    "⚽🏀🚗🚀✈🏠⏰🔑🎁🎈👑💎🔔📚"
)
EVERYDAY_FILE = Path(__file__).with_name("everyday_concepts.tsv")


def everyday_concepts() -> list[str]:
    """The default set (about 430 everyday emoji), written by scripts/concept_set.py."""
    lines = EVERYDAY_FILE.read_text(encoding="utf-8").splitlines()
    return [ln.split("\t")[0] for ln in lines if ln and not ln.startswith("#")]


# Training captions; the held-out templates never appear in training data.
TRAIN_TEMPLATES = (
    "{name}",
    "a {name} emoji",
    "{name} emoji",
    "an emoji of a {name}",
    "a picture of a {name}",
    "{name} icon",
)
HELDOUT_TEMPLATES = (
    "a drawing of a {name}",
    "a cartoon {name}",
    "{name}, small cartoon picture",
    "an illustration showing a {name}",
)


def concept_name(ch: str) -> str:
    import emoji

    data = emoji.EMOJI_DATA.get(ch) or emoji.EMOJI_DATA.get(ch + "\ufe0f")
    if data is None:
        raise InputError(f"not an emoji: {ch!r}")
    return data["en"].strip(":").replace("_", " ").lower()


def concept_list(which: str) -> list[str]:
    """'everyday' (the default set, about 430), 'classic' (the previous model's 107), 'all'
    (every fully-qualified single emoji), or a string of emoji characters."""
    import emoji

    if which in ("everyday", "default"):
        return everyday_concepts()
    if which == "classic":
        return list(CLASSIC_CONCEPTS)
    if which == "all":
        return sorted(
            ch
            for ch, d in emoji.EMOJI_DATA.items()
            if d.get("status") == emoji.STATUS["fully_qualified"]
            and len(ch.replace("\ufe0f", "")) == 1
        )
    return [c for c in which if c.strip() and c != "\ufe0f"]


def captions_for(name: str, keywords: list[str]) -> tuple[list[str], list[str]]:
    train = [t.format(name=name) for t in TRAIN_TEMPLATES]
    kw = [k for k in keywords if k not in name.split()][:3]
    if kw:
        train.append(f"{name.split()[-1]}, {', '.join(kw[:2])}")
    held = [t.format(name=name) for t in HELDOUT_TEMPLATES]
    return train, held


def _free_paraphrases(ch: str, train: list[str]) -> list[str]:
    """This concept's free paraphrases; one that equals a training caption is a bug."""
    out = list(FREE_PARAPHRASES.get(ch.replace("\ufe0f", ""), ()))
    clash = {p.lower() for p in out} & {t.lower() for t in train}
    if clash:
        raise InputError(f"free paraphrase equals a training caption: {sorted(clash)}")
    return out


def build_emoji(
    out: str | Path,
    size: int = 16,
    concepts: str = "default",
    styles: tuple[str, ...] = STYLES,
    log=print,
) -> Path:
    if size < 8 or size % 4:
        raise InputError(f"--size must be a multiple of 4 and >= 8, got {size}")
    out = Path(out)
    sources = open_sources(list(styles), log=log)
    if not sources:
        raise InputError("no emoji source is installed; see the messages above")
    chars = concept_list(concepts)
    keywords = gemojione_keywords()
    names = [concept_name(ch) for ch in chars]
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, labels, styles_of, caps, rows = [], [], [], [], []
    heldout, free = [], []
    counts = {s.name: 0 for s in sources}
    for k, (ch, name) in enumerate(zip(chars, names, strict=True)):
        train, held = captions_for(name, keywords.get(ch.replace("\ufe0f", ""), []))
        heldout.append("\n".join(held))
        free.append("\n".join(_free_paraphrases(ch, train)))
        for src in sources:
            rgba = src.render(ch)
            if rgba is None:
                continue
            bg = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
            rgb = Image.alpha_composite(bg, rgba).convert("RGB")
            small = rgb.resize((size, size), Image.Resampling.BOX)  # area average
            fname = f"images/{src.name}_{'-'.join(f'{ord(c):x}' for c in ch)}.png"
            atomic_write(out / fname, lambda f, im=small: im.save(f, format="PNG"))
            images.append(np.asarray(small))
            labels.append(k)
            styles_of.append(src.name)
            caps.append("\n".join(train))
            rows.append({"file_name": fname, "text": train})
            counts[src.name] += 1
    if not images:
        raise InputError("no emoji rendered")
    meta = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(out / "metadata.jsonl", lambda f: f.write(meta.encode()))
    arrays = {
        "images": np.stack(images),
        "labels": np.array(labels, np.int64),
        "label_names": np.array(names),
        "emoji": np.array(chars),
        "styles": np.array(styles_of),
        "captions": np.array(caps),
        "heldout": np.array(heldout),
        "paraphrases": np.array(free),
    }
    atomic_write(out / "emoji.npz", lambda f: np.savez_compressed(f, **arrays))
    lines = [
        "# Emoji data set: sources and licences",
        "",
        f"{len(images)} images of {len(chars)} emoji at {size}x{size}, background "
        f"RGB{BACKGROUND}, built by `ddpm-rt data emoji`.",
        "",
        "| style | images | source | licence |",
        "| --- | ---: | --- | --- |",
    ]
    for s in sources:
        lines.append(
            f"| {s.name} | {counts[s.name]} | {LICENCES[s.name][0]} | {LICENCES[s.name][1]} |"
        )
    lines += [
        "",
        "Captions: CLDR short names via the PyPI package `emoji` (BSD), keywords from "
        "gemojione's index.json (MIT), templates written for this project.",
        "",
    ]
    atomic_write(out / "ATTRIBUTION.md", lambda f: f.write("\n".join(lines).encode()))
    per_style = ", ".join(f"{k} {v}" for k, v in counts.items())
    log(f"wrote {len(images)} images of {len(chars)} emoji ({per_style}) to {out}")
    return out
