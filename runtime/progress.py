"""What a caller sees of a run's progress: the step callback's :class:`StepInfo` and the
progress bar."""

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
