"""What this machine offers the GPU path, and exactly why not when it offers nothing.

Imports nothing GPU-related at module level: ``tensorrt`` (NVIDIA's wheel, or JetPack's
bindings on a Jetson) and ``cuda-python`` (``cuda.bindings.runtime``; older releases named it
``cuda.cudart``) are optional. Every question returns an answer or a one-line reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from ddpm_rt.errors import BackendError

INSTALL_TRT = (
    "pip install 'ddpm-rt[trt]' (NVIDIA's tensorrt wheel and cuda-python); on a Jetson use "
    "JetPack's TensorRT Python bindings and pip install cuda-python"
)


def tensorrt():
    """The ``tensorrt`` module, or BackendError saying how to install it."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:
        raise BackendError(f"TensorRT is not installed ({e.msg}); {INSTALL_TRT}") from None
    except Exception as e:  # its loader fails on a broken install (missing libnvinfer)
        raise BackendError(f"TensorRT is installed but does not load: {e}") from None


def cudart():
    """cuda-python's runtime API module, or BackendError saying how to install it."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):  # new name first (cuda-python >= 12.6)
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
        except Exception as e:
            raise BackendError(f"cuda-python is installed but does not load: {e}") from None
    raise BackendError("cuda-python is not installed; pip install cuda-python")


def check(result, what: str):
    """cuda-python returns (error, *values): raise on an error, return the value(s)."""
    err, *values = result
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise BackendError(f"CUDA error in {what}: {name}")
    return values[0] if len(values) == 1 else tuple(values)


def handle(obj) -> int:
    """The address a CUDA object (a ``cudaStream_t``, say) wraps, as the int TensorRT's
    ``execute_async_v3(stream_handle)`` takes. cuda-bindings 12.9.1/13.0 deprecated
    ``int(obj)`` for this ("subject to future removal", 13.0.0 release notes) in favour of
    ``cuda.bindings.utils.get_cuda_native_handle``; older releases have only ``int``."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def device_name(prop) -> str:
    """cudaDeviceProp.name as text (cuda-python gives bytes, NUL-padded)."""
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else prop.name
    return name.rstrip("\x00")


@dataclass
class GpuReport:
    tensorrt_version: str | None = None
    tensorrt_why: str | None = None
    cuda_python_why: str | None = None
    driver_version: str | None = None
    runtime_version: str | None = None
    devices: list[dict] = field(default_factory=list)  # name, compute_capability, memory_gib
    gpu_why: str | None = None
    ort_providers: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return bool(self.devices)


def _nvidia_driver_present() -> bool:
    """Linux's NVIDIA kernel driver (desktop and Jetson alike) exposes this file."""
    import os

    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvhost-ctrl")


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def probe() -> GpuReport:
    """Ask every optional layer what it can do; never raises."""
    import onnxruntime as ort

    r = GpuReport(ort_providers=list(ort.get_available_providers()))
    try:
        r.tensorrt_version = tensorrt().__version__
    except BackendError as e:
        r.tensorrt_why = str(e)
    try:
        rt = cudart()
    except BackendError as e:
        r.cuda_python_why = str(e)
        if not _nvidia_driver_present():
            r.gpu_why = "no NVIDIA GPU driver on this machine (no /proc/driver/nvidia/version)"
        else:
            r.gpu_why = f"cannot ask for GPUs: {e}"
        return r
    try:
        r.driver_version = _cuda_version(check(rt.cudaDriverGetVersion(), "driver version"))
        r.runtime_version = _cuda_version(check(rt.cudaRuntimeGetVersion(), "runtime version"))
        if r.driver_version == "0.0":
            r.gpu_why = "no NVIDIA driver is installed"
            return r
        err, count = rt.cudaGetDeviceCount()
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            hint = {
                "cudaErrorNoDevice": "no CUDA GPU found",
                "cudaErrorInsufficientDriver": (
                    f"the NVIDIA driver (CUDA {r.driver_version}) is older than this CUDA "
                    f"runtime ({r.runtime_version}); update the driver"
                ),
            }.get(name, f"CUDA error {name}")
            r.gpu_why = hint
            return r
        for i in range(count):
            prop = check(rt.cudaGetDeviceProperties(i), "device properties")
            r.devices.append(
                {
                    "name": device_name(prop),
                    "compute_capability": (int(prop.major), int(prop.minor)),
                    "memory_gib": round(int(prop.totalGlobalMem) / 2**30, 1),
                }
            )
        if not r.devices:
            r.gpu_why = "no CUDA GPU found"
    except BackendError as e:
        r.gpu_why = str(e)
    return r


def backend_status(r: GpuReport) -> list[dict]:
    """One row per backend: name, usable, why (when not), what it runs."""
    rows = [
        {
            "backend": "ort (CPUExecutionProvider)",
            "usable": "CPUExecutionProvider" in r.ort_providers,
            "why": None,
            "precisions": "fp32, int8 (QOperator), int8-qdq, fp16",
        }
    ]
    for provider, label in (
        ("CUDAExecutionProvider", "ort (CUDAExecutionProvider)"),
        ("TensorrtExecutionProvider", "ort (TensorrtExecutionProvider)"),
    ):
        why = None
        if provider not in r.ort_providers:
            why = (
                f"this onnxruntime has no {provider} (pip install onnxruntime-gpu in place of "
                "onnxruntime; on a Jetson, the onnxruntime-gpu wheel built for JetPack)"
            )
        elif not r.gpu:
            why = r.gpu_why or "no CUDA GPU found"
        rows.append(
            {
                "backend": label,
                "usable": why is None,
                "why": why,
                "precisions": "fp32, fp16, int8-qdq",
            }
        )
    why = r.tensorrt_why or r.cuda_python_why or (None if r.gpu else r.gpu_why)
    rows.append(
        {
            "backend": f"trt (TensorRT {r.tensorrt_version or '-'})",
            "usable": why is None,
            "why": why,
            "precisions": "fp32, fp16, int8 (the Q/DQ graph)",
        }
    )
    return rows
