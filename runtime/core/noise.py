"""Seeded noise: one stream per image, reproducible from this text alone.

Image ``i`` of a call (``i`` counts the images of one prompt: 0, 1, ... ``num - 1``) draws
all of its noise from its own stream, so it is the same image whatever ``num``, batch size,
guidance batching, thread or other prompts of the call. The derivation, precisely:

1. **Bits.** Philox4x64-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2,
   3"; the Random123 reference constants: multipliers 0xD2E7470EE14C6C93 and
   0xCA5A826395121157, key increments 0x9E3779B97F4A7C15 and 0xBB67AE8584CAA73B, ten
   rounds) with the 128-bit key ``(seed, i)`` (two 64-bit words, seed first). Block ``b``
   (b = 1, 2, 3, ...) is the Philox function of the 256-bit counter ``(b, 0, 0, 0)`` (the
   first word is the low one) and yields four 64-bit words, in order. The image's stream of
   64-bit words is block 1's four words, then block 2's, and so on. (This is NumPy's
   ``numpy.random.Philox(key=[seed, i])``, whose first block uses counter 1, read with
   ``random_raw``.)
2. **Normals.** Consecutive words ``(a, b)`` of the stream become two standard normals by
   the Box-Muller transform in float64: ``u1 = ((a >> 11) + 1) * 2**-53`` (in (0, 1]),
   ``u2 = (b >> 11) * 2**-53`` (in [0, 1)), ``r = sqrt(-2 ln u1)``, ``z1 = r cos(2 pi u2)``,
   ``z2 = r sin(2 pi u2)``; each is rounded to float32.
3. **Order.** An image's draws follow one another on its stream: first its initial noise,
   then one draw per step that adds noise, in step order (which steps add noise is each
   sampler's contract). A draw of shape (C, H, W) takes ``C*H*W`` normals in C order (C*H*W
   is even: H and W are multiples of 4).

Scope of "the same": with the same ONNX Runtime build and CPU instruction set, image i is
byte-identical; on other providers or backends the U-Net's output differs within the
tolerance table, and so does the image.
"""

from __future__ import annotations

import numpy as np

_SCALE = 2.0**-53


def box_muller(words: np.ndarray) -> np.ndarray:
    """(..., 2n) uint64 words -> (..., 2n) float32 normals, as step 2 of the module text."""
    a, b = words[..., 0::2], words[..., 1::2]
    u1 = ((a >> np.uint64(11)).astype(np.float64) + 1.0) * _SCALE
    u2 = (b >> np.uint64(11)).astype(np.float64) * _SCALE
    r = np.sqrt(-2.0 * np.log(u1))
    theta = 2.0 * np.pi * u2
    out = np.empty(words.shape, dtype=np.float64)
    out[..., 0::2] = r * np.cos(theta)
    out[..., 1::2] = r * np.sin(theta)
    return out.astype(np.float32)


class ImageNoise:
    """The sampler's noise source for a batch of images: row k of every draw comes from the
    stream of image ``indices[k]`` of ``seed`` (an int, or one seed per row: rows of
    different requests run in one batch). Implements ``standard_normal(shape, dtype)`` as the
    samplers' contract expects; per-call state, never shared between calls or threads.

    Normals are made ahead in blocks of several draws (at most ``draws`` -- the run's count,
    when the caller knows it -- and about ``block_bytes`` of output), one vectorised
    Box-Muller per block: the streams are read in order either way, so the values are the
    same, and a few-step run pays for its transcendental functions once, not per step."""

    def __init__(self, seed: int, indices, draws: int = 64, block_bytes: int = 1 << 20):
        indices = list(indices)
        seeds = np.broadcast_to(np.asarray(seed, dtype=object), (len(indices),))
        self._streams = [
            np.random.Philox(key=[int(s), int(i)]) for s, i in zip(seeds, indices, strict=True)
        ]
        self._draws, self._block_bytes = max(1, draws), block_bytes
        self._ready = np.empty((len(self._streams), 0), dtype=np.float32)
        self._used = 0

    def standard_normal(self, shape, dtype=np.float32) -> np.ndarray:
        b, *rest = shape
        if b != len(self._streams) or dtype != np.float32:
            raise ValueError(f"draw of shape {shape} for {len(self._streams)} images")
        n = int(np.prod(rest))
        if n % 2:
            raise ValueError("a draw must hold an even number of values")
        if self._used + n > self._ready.shape[1]:
            draws = max(1, min(self._draws, self._block_bytes // (4 * n * max(1, b))))
            words = np.stack([s.random_raw(n * draws) for s in self._streams])
            self._ready = np.concatenate([self._ready[:, self._used :], box_muller(words)], 1)
            self._used = 0
        out = self._ready[:, self._used : self._used + n]
        self._used += n
        return out.reshape(shape)

    def keep(self, rows: np.ndarray) -> None:
        """Drop the rows outside a boolean mask: the other rows' streams go on unchanged."""
        rows = np.asarray(rows, dtype=bool)
        self._streams = [s for s, k in zip(self._streams, rows, strict=True) if k]
        self._ready = self._ready[rows]
