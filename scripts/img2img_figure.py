"""docs/img2img.png: one picture of image-to-image and inpainting on the shipped model.

Left to right: the input (a render of "red apple", seed 3), variations at strength 0.3, 0.5
and 0.7 (seed 9), the mask (white: repaint), and the inpainting "a blue car" (strength 0.9,
seed 5). Run: python scripts/img2img_figure.py [OUT]"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from ddpm_rt import Generator


def main(out: str = "docs/img2img.png") -> None:
    gen = Generator("models/default")
    picture = gen.generate("red apple", seed=3)[0]
    tiles = [picture]
    for s in (0.3, 0.5, 0.7):
        tiles.append(gen.generate("red apple", seed=9, init_image=picture, strength=s)[0])
    yy, xx = np.mgrid[:64, :64]
    mask = (yy - 34) ** 2 + (xx - 32) ** 2 < 15**2
    tiles.append(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2))
    tiles.append(
        gen.generate("a blue car", seed=5, init_image=picture, mask=mask, strength=0.9)[0]
    )
    pad = np.full((64, 4, 3), 255, np.uint8)
    row = np.concatenate([x for t in tiles for x in (t, pad)][:-1], axis=1)
    Image.fromarray(row).resize((row.shape[1] * 2, 128), Image.Resampling.NEAREST).save(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
