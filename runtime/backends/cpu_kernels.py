"""Which family of ONNX Runtime's CPU kernels this machine runs, asked of the kernels themselves.

ONNX Runtime (MLAS) picks its kernels from CPUID when it loads, with no switch to choose
them. Two families compute different numbers for the same int8 graph (see
:data:`ddpm_rt.export.variants.REDUCE_RANGE_WHY`): on x86-64 without VNNI (AVX2, AVX-512BW)
the u8 x s8 dot product adds two products into a saturating int16 (VPMADDUBSW), while VNNI
(VPDPBUSD) and ARM64 (SDOT/UDOT, widening multiplies) sum into int32. So the family is
measured, not read from ``/proc/cpuinfo`` (which an emulator or a container may not match
to the CPUID that ONNX Runtime sees): one MatMulInteger of 255 x 127 pairs, 126 bytes of
ONNX, well under a millisecond once per process.

:func:`family` names the family as a figure's record says where it was measured
(``ddpm-rt quantize`` writes it beside the int8 parity figures; ``ddpm-rt doctor`` compares
it with this CPU's), and it keys the optimised-graph cache.
"""

from __future__ import annotations

import base64
import functools
import platform

import numpy as np

# MatMulInteger(a: uint8[m, k], b: int8[k, n]) -> int32[m, n], opset 13, made with
# onnx.helper (tests/test_cpu_kernels.py rebuilds it and compares).
PROBE_ONNX = base64.b64decode(
    "CAgSB2RkcG0tcnQ6awoYCgFhCgFiEgF5Ig1NYXRNdWxJbnRlZ2VyEgp1OHM4X3Byb2JlWhUKAWESEAoOCAISCgoDEgFt"
    "CgMSAWtaFQoBYhIQCg4IAxIKCgMSAWsKAxIBbmIVCgF5EhAKDggGEgoKAxIBbQoDEgFuQgQKABAN"
)
# 4 x 64 by 64 x 16: every pair of products is 2 x 255 x 127 = 64,770 > 32,767.
_M, _K, _N = 4, 64, 16

U8S8_EXACT = "u8s8-exact"
U8S8_SATURATING = "u8s8-saturating"
_WHAT = {
    U8S8_EXACT: "int8 dot products sum into int32 (VNNI, or ARM64)",
    U8S8_SATURATING: "int8 dot products saturate in int16 (x86-64 AVX2/AVX-512 without VNNI)",
}


def u8s8_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for uint8 ``a`` and int8 ``b`` as this CPU's ONNX Runtime computes it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(PROBE_ONNX, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"a": a, "b": b})[0]


@functools.cache
def int8_kind() -> str:
    """:data:`U8S8_EXACT` or :data:`U8S8_SATURATING`, measured on this CPU."""
    a = np.full((_M, _K), 255, np.uint8)
    b = np.full((_K, _N), 127, np.int8)
    exact = _K * 255 * 127
    return U8S8_EXACT if bool((u8s8_sum(a, b) == exact).all()) else U8S8_SATURATING


def family() -> str:
    """This CPU's kernel family, e.g. ``x86_64/u8s8-exact``: the architecture and how its
    int8 dot products add up."""
    return f"{platform.machine() or 'unknown'}/{int8_kind()}"


def describe(fam: str) -> str:
    """A family in words, for logs and ``doctor``."""
    arch, _, kind = fam.partition("/")
    return f"{arch}, {_WHAT.get(kind, kind or 'int8 kernels not recorded')}"
