"""Strict test doubles of the GPU libraries (``tensorrt``, ``cuda.bindings.runtime``), for
contract tests that run the TensorRT code on a CPU. Test-only: never part of the package.

``install(monkeypatch, ...)`` puts them in ``sys.modules`` for one test, on a fresh
simulated machine; ``monkeypatch`` takes them out again afterwards.
"""

from __future__ import annotations

import sys
import types

from doubles import cuda_runtime
from doubles import tensorrt as tensorrt_double


def install(
    monkeypatch,
    tensorrt: str | None = "10.3.0",
    cuda: str = "13.4",
    devices=(("NVIDIA H200", 9, 0, 141 << 30),),
    driver: int = 13000,
    runtime: int = 13000,
):
    """Make ``import tensorrt`` (unless ``tensorrt`` is None) and ``import
    cuda.bindings.runtime`` give the doubles, playing these versions and this machine.
    Returns the CUDA double's machine state (devices, memory, streams, switches).
    ``monkeypatch`` None: for good, in this process (tests/doubles/site/sitecustomize.py)."""
    if monkeypatch is None:
        monkeypatch = _ForGood()
    state = cuda_runtime.reset(
        version=tuple(int(v) for v in cuda.split(".")[:2]),
        devices=[tuple(d) for d in devices],
        driver=driver,
        runtime=runtime,
    )
    package = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    package.bindings, bindings.runtime = bindings, cuda_runtime
    package.__path__, bindings.__path__ = [], []  # packages, as the real ones are
    monkeypatch.setitem(sys.modules, "cuda", package)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda_runtime)
    if state.version >= (12, 9):  # cuda.bindings.utils came with 12.9.1 / 13.0.0
        bindings.utils = cuda_runtime.utils_module()
        monkeypatch.setitem(sys.modules, "cuda.bindings.utils", bindings.utils)
    else:
        monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)  # ImportError
    if tensorrt is None:
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_double.make(tensorrt))
    return state


class _ForGood:
    """monkeypatch.setitem without the undo, for a process that only runs the doubles."""

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value


def use_device(state, index: int) -> None:
    """Switch the simulated current GPU (what cudaGetDevice answers)."""
    state.current = index
