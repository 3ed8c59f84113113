"""Write ``training/everyday_concepts.tsv``: the default model's concept set, by a rule.

The rule (issue 11), applied to the emoji metadata of the npm package
``emoji-datasource-twitter`` (its ``emoji.json``: category, subcategory, carrier codes):

1. single emoji (one code point, optionally + U+FE0F): no sequences, flags or skin tones;
2. from the original carrier set -- the emoji with a Japanese carrier code (docomo, au or
   SoftBank), the ones phones have offered since before Unicode 6.0 and people type most;
3. in the everyday subcategories listed in ``SUBCATEGORIES`` (faces, gestures, animals,
   plants, food and drink, weather, transport, events, sports, games, music and common
   objects, hearts and warnings); left out on purpose: letters/keycaps, arrows,
   geometric and audio-visual symbols, zodiac, clocks, flags, people, clothing, books and
   paper, money, buildings (at 16x16 these are rectangles or figures that look alike, or
   not things one asks a picture of) and regional Asian dishes;
4. plus ``EXPLICIT``: the previous default model's 107 concepts (so it can be compared on
   them) and everyday emoji added after the carrier set that the issue names.

Usage: python scripts/concept_set.py [PATH/emoji-datasource-twitter]
(default: $DDPM_RT_TWEMOJI_DIR). Deterministic: the order is the data source's sort order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SUBCATEGORIES = frozenset(
    "face-smiling|face-affection|face-tongue|face-hand|face-neutral-skeptical|face-sleepy|"
    "face-unwell|face-hat|face-glasses|face-concerned|face-negative|face-costume|cat-face|"
    "monkey-face|heart|emotion|hand-fingers-open|hand-fingers-partial|hand-single-finger|"
    "hand-fingers-closed|hands|body-parts|animal-mammal|animal-bird|animal-amphibian|"
    "animal-reptile|animal-marine|animal-bug|plant-flower|plant-other|food-fruit|"
    "food-vegetable|food-prepared|food-sweet|drink|dishware|sky & weather|transport-ground|"
    "transport-air|transport-water|event|award-medal|sport|game|music|musical-instrument|"
    "phone|computer|light & video|lock|tool|household|sound|medical|science|other-object|"
    "writing|warning".split("|")
)
# the 107 concepts of the model shipped before (ddpm-rt 0.x, training/emoji.py CLASSIC_107)
CLASSIC_107 = (
    "🍎🍏🍌🍇🍉🍊🍋🍓🍒🍑🍍🥝🥑🍆🥕🌽🍄🍕🍔🍟🌭🍩🍪🎂🍦🧀🥚🍞"
    "😀😂😍😎😡😢😱😴🤔😉🤢🥶🥵👻💀👽🤖💩🤡😇"
    "🐶🐱🐭🐰🦊🐻🐼🐨🐯🦁🐮🐷🐸🐵🐔🐧🐤🦄🐙🐢🐍🐳🐟🦋🐝🐞"
    "❤💙💚💛💜⭐☀🌙☁🌈⚡🔥❄💧🌵🌲🌻🌹🍀"
    "⚽🏀🚗🚀✈🏠⏰🔑🎁🎈👑💎🔔📚"
)
# everyday emoji from after the carrier set, named in the issue or as common as its examples
EXPLICIT = "📖✂☃🥛🍻🥂🥤🧁🥐🥪🌮🍿🥓🦀🦈🦉🦆🐿🦒🦓🤗🤩🥳🥺🤞🤝👏🦷🧠🎧🏈🏐🚲🛴🚁⛺🌋🔦🧸🔭🧲"


def _char(unified: str) -> str:
    return "".join(chr(int(h, 16)) for h in unified.split("-"))


def select(entries: list[dict]) -> list[tuple[str, str, str]]:
    """(emoji without FE0F, subcategory, why) in the source's sort order."""
    by_char = {}
    for e in sorted(entries, key=lambda e: e["sort_order"]):
        parts = e["unified"].split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[1] != "FE0F"):
            continue
        by_char[_char(parts[0])] = e
    out, seen = [], set()
    for ch, e in by_char.items():
        carrier = e.get("docomo") or e.get("au") or e.get("softbank")
        if carrier and e["subcategory"] in SUBCATEGORIES:
            out.append((ch, e["subcategory"], "rule"))
            seen.add(ch)
    for why, chars in (("classic", CLASSIC_107), ("explicit", EXPLICIT)):
        for ch in chars:
            if ch == "\ufe0f" or ch in seen:
                continue
            if ch not in by_char:
                raise SystemExit(f"{ch!r} is not in emoji.json")
            out.append((ch, by_char[ch]["subcategory"], why))
            seen.add(ch)
    order = {ch: e["sort_order"] for ch, e in by_char.items()}
    return sorted(out, key=lambda r: order[r[0]])


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else os.environ.get("DDPM_RT_TWEMOJI_DIR", ""))
    entries = json.loads((root / "emoji.json").read_text())
    rows = select(entries)
    out = Path(__file__).resolve().parent.parent / "training/everyday_concepts.tsv"
    head = (
        "# The default model's concept set: written by scripts/concept_set.py (the rule is its\n"
        "# docstring) from emoji-datasource-twitter's emoji.json. emoji<TAB>subcategory<TAB>why\n"
    )
    out.write_text(head + "".join(f"{c}\t{s}\t{w}\n" for c, s, w in rows), encoding="utf-8")
    print(f"wrote {len(rows)} concepts to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
