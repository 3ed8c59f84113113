"""Per step of a generation: the U-Net call with classifier-free guidance (everything fixed
for a run made once), the step hook's :class:`StepInfo`, and the progress bar."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepInfo:
    """What a :meth:`Generator.generate` callback sees after each step."""

    step: int  # 1-based, across the whole call
    total: int  # steps of the whole call (steps x batch chunks)
    chunk_step: int  # 1-based within the current chunk
    chunk_steps: int
    timestep: int  # the timestep t this step started from
    first_image: int  # index of the chunk's first image in the call's output
    images: int  # images in the chunk
    preview: np.ndarray | None  # (images, H, W, 3) uint8 estimate of the clean images, or None


class NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return NoBar()
    from tqdm import tqdm  # imported only when shown: it costs ~15 ms of a cold start

    return tqdm(total=total, desc=desc, unit="step", leave=False)


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
