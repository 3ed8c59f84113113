"""The one tolerance table: how closely a backend must match the torch reference.

Keyed by (backend, precision). ``check`` passes when |a - b| <= atol + rtol * |b| everywhere.
Every entry looser than the first says why.
"""

from __future__ import annotations

import numpy as np

TOLERANCES: dict[tuple[str, str], dict[str, float]] = {
    # fp32 ONNX Runtime vs torch eager: same math, different kernels and summation order.
    ("ort", "fp32"): {"rtol": 1e-3, "atol": 1e-5},
}


def check(
    backend: str, precision: str, actual: np.ndarray, reference: np.ndarray
) -> tuple[bool, float]:
    """(passes, worst excess over the allowed error: <= 0 when it passes)."""
    tol = TOLERANCES[(backend, precision)]
    err = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    allowed = tol["atol"] + tol["rtol"] * np.abs(reference.astype(np.float64))
    excess = float((err - allowed).max()) if err.size else 0.0
    return excess <= 0.0, excess
