"""The guided U-Net step: one U-Net call per sampler step with classifier-free guidance, per
row (Ho & Salimans 2022, eq. 6): eps = eps_uncond + w (eps_cond - eps_uncond).

Rows of one call may belong to different requests, each with its own guidance scale ``w``
and its own unconditional context (the null context, or a negative prompt's). Every row
goes through the call conditionally; the guided rows (``w != 1``) go through it a second
time with their unconditional context, in the same call. The combination is float32
elementwise arithmetic per row, so a row's result does not depend on which other rows share
its call.

A guidance-distilled U-Net (Meng et al. 2023; issue 29) takes each row's w as a 4th input
``w`` and returns the guided eps itself: every row goes through the call once, whatever its
scale (``takes_w``).
"""

from __future__ import annotations

import numpy as np


def unet_rows_per_step(guidance: float, takes_w: bool = False) -> int:
    """U-Net rows one image makes per step: its conditional row, and with ``guidance != 1``
    its unconditional one -- none when the graph takes w (:class:`GuidedUNet`'s rule)."""
    return 1 if takes_w or guidance == 1.0 else 2


class GuidedUNet:
    """One run's U-Net call, with everything fixed for the run made once: the context rows
    (conditional rows, then the guided rows' unconditional ones), the input buffers and the
    per-row scales.

    ``contexts`` (R, D); ``guidance`` (R,) per-row scales; ``uncond`` (R, D) each row's
    unconditional context (only the guided rows' are used). ``takes_w``: the graph is
    guidance-distilled: one row per image, ``w`` fed, no unconditional rows."""

    def __init__(
        self,
        backend,
        graph: str,
        image_shape: tuple[int, ...],
        contexts: np.ndarray,
        guidance: np.ndarray,
        uncond: np.ndarray,
        takes_w: bool = False,
    ):
        self.backend, self.graph, self.image_shape = backend, graph, tuple(image_shape)
        self.takes_w = takes_w
        self._contexts = np.ascontiguousarray(contexts, dtype=np.float32)
        self._scales = np.asarray(guidance, dtype=np.float32).reshape(-1)
        self._uncond = np.asarray(uncond, dtype=np.float32)
        self._prepare()

    def _prepare(self) -> None:
        rows = len(self._contexts)
        self.rows = rows
        # rows with a second, unconditional pass (none when the graph takes w)
        self.guided = np.flatnonzero(self._scales != 1.0) if not self.takes_w else np.arange(0)
        self.w = self._scales.reshape(-1, 1).copy() if self.takes_w else None
        self.all_guided = len(self.guided) == rows
        self.scale = self._scales[self.guided].reshape(-1, *([1] * len(self.image_shape)))
        self.c = np.ascontiguousarray(
            np.concatenate([self._contexts, self._uncond[self.guided]]), dtype=np.float32
        )
        self.x = np.empty((len(self.c), *self.image_shape), dtype=np.float32)
        self.t = np.empty((len(self.c), 1), dtype=np.float32)

    def keep(self, rows: np.ndarray) -> None:
        """Drop the rows outside a boolean mask (a request that ended early)."""
        self._contexts, self._scales = self._contexts[rows], self._scales[rows]
        self._uncond = self._uncond[rows]
        self._prepare()

    def __call__(self, x: np.ndarray, t_value: float) -> tuple[np.ndarray, np.ndarray]:
        """eps (R, C, H, W) for x at time input ``t_value``, and the graph's raw output
        ((R + G) rows: conditional, then the guided rows' unconditional) for naming what
        went wrong when a row turns non-finite."""
        r = self.rows
        self.x[:r] = x
        if len(self.guided):
            self.x[r:] = x if self.all_guided else x[self.guided]
        self.t.fill(t_value)
        feeds = {"x": self.x, "t": self.t, "c": self.c}
        if self.takes_w:
            feeds["w"] = self.w
        out = self.backend.run(self.graph, feeds)["eps"]
        if not len(self.guided):
            return out, out
        cond, uncond = out[:r], out[r:]
        if self.all_guided:
            return uncond + self.scale * (cond - uncond), out
        eps = cond.copy()
        eps[self.guided] = uncond + self.scale * (cond[self.guided] - uncond)
        return eps, out

    def raw_rows(self, out: np.ndarray, row: int) -> list[np.ndarray]:
        """The graph's own outputs for ``row`` of the call: its conditional row, and its
        unconditional row when guided."""
        parts = [out[row]]
        hit = np.flatnonzero(self.guided == row)
        if len(hit):
            parts.append(out[self.rows + int(hit[0])])
        return parts
