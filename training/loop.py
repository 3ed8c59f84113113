"""What the trainers share (the U-Net's :mod:`.train`, :mod:`.autoencoder_train`,
:mod:`.upscaler_train`): the device choice and the seeded batch order."""

from __future__ import annotations

import numpy as np
import torch

from ddpm_rt.errors import InputError


def pick_device(name: str) -> torch.device:
    """``--device``: "auto" is CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA GPU is available")
    return torch.device(name)


def batch_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """The rows of step ``step``: epoch e is the permutation ``PCG64([seed, e])`` of the n
    rows, cut into ``max(1, n // batch)`` batches (a short last batch is dropped)."""
    epoch, pos = divmod(step, max(1, n // batch))
    perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)
    idx = perm[pos * batch : (pos + 1) * batch]
    return idx if len(idx) else perm[:batch]
