"""The guided U-Net step: one U-Net call per sampler step with classifier-free guidance
(conditional and unconditional rows batched into one call, then combined)."""

from __future__ import annotations

import numpy as np


class UNetStep:
    """One chunk's U-Net call, with everything fixed for the run made once: the context rows
    (conditional, then unconditional), the input buffers, the time input's array."""

    def __init__(self, gen, b: int, c: np.ndarray, guided: bool, guidance):
        """``gen``: the Generator (its backend, U-Net graph and image shape)."""
        self.backend = gen.backend
        self.graph = gen.unet_graph
        self.b, self.guided, self.guidance = b, guided, guidance
        self.c = np.ascontiguousarray(c, dtype=np.float32)
        rows = len(self.c)
        self.x = np.empty((rows, *gen.bundle.image_shape), dtype=np.float32)
        self.t = np.empty((rows, 1), dtype=np.float32)

    def __call__(self, x: np.ndarray, t_value: float) -> np.ndarray:
        b = self.b
        self.x[:b] = x
        if self.guided:
            self.x[b:] = x
        self.t.fill(t_value)
        out = self.backend.run(self.graph, {"x": self.x, "t": self.t, "c": self.c})["eps"]
        if not self.guided:
            return out
        cond, uncond = out[:b], out[b:]
        if not np.isfinite(out).all():
            # Hand the loop's check what the graph produced (Inf - Inf would read as NaN).
            return cond if not np.isfinite(cond).all() else uncond
        return uncond + self.guidance * (cond - uncond)
