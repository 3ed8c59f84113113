"""A strict test double of ``cuda.bindings.runtime`` (cuda-python 12.x/13.x), for the part of
the CUDA runtime API ddpm-rt calls. Never shipped: it lives under tests/.

Conventions taken from the real bindings (cuda-bindings 13.4, checked against the installed
module by tests/test_trt_contract.py::test_cuda_double_matches_the_real_bindings, which
compares every function's parameters, parsed from its docstring's first line, and every enum
member the double defines):

* every function returns a tuple: ``(cudaError_t, *values)``; ``(err,)`` when it has none
  (e.g. ``cudaMalloc(size_t size)`` -> ``(err, devPtr: int)``; ``cudaFree(devPtr)`` -> ``(err,)``);
* device and pinned host pointers are plain ints; streams, graphs and graph execs are handle
  objects (``cudaStream_t``, ``cudaGraph_t``, ``cudaGraphExec_t``);
* cuda-bindings 13.0.0 release notes: "Using int(cuda_obj) to retrieve the underlying address
  of a CUDA object is deprecated and subject to future removal. Please switch to use
  get_cuda_native_handle() instead." -- this double's handles refuse ``int()`` when it plays
  13.x, and its ``cuda.bindings.utils`` has ``get_cuda_native_handle``; playing 12.6 it has
  no ``utils`` module and ``int()`` works, as there.

What it refuses (with the error code the real runtime returns, never an exception, as the
bindings do): memory it never allocated or already freed, copies past an allocation's end,
a stream that does not exist, launching or capturing on a destroyed stream, ending a capture
that an enqueue invalidated (``cudaErrorStreamCaptureInvalidated``). Work is done eagerly in
stream order; a capturing stream records instead of running, and a graph launch replays.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import threading
import types

# -- enums (names and values as in cuda.bindings.runtime) -----------------------------------


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorIllegalAddress = 700


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


OK = cudaError_t.cudaSuccess


class _Handle:
    """A CUDA handle object; ``int()`` on it is the 13.x deprecation (refused when strict)."""

    def __init__(self, address: int):
        self._address = address

    def __int__(self):
        if STATE.version >= (13, 0):
            raise DeprecationWarning(
                "int(cuda_obj) is deprecated and subject to future removal; use "
                "cuda.bindings.utils.get_cuda_native_handle (cuda-bindings 13.0.0 notes)"
            )
        return self._address

    def __eq__(self, other):
        return type(other) is type(self) and other._address == self._address

    def __hash__(self):
        return hash(self._address)

    def __repr__(self):
        return f"<{type(self).__name__} {self._address:#x}>"


class cudaStream_t(_Handle):
    pass


class cudaGraph_t(_Handle):
    pass


class cudaGraphExec_t(_Handle):
    pass


class cudaDeviceProp:
    """The fields ddpm-rt reads; ``name`` is bytes, NUL-padded to 256 as in the struct."""

    def __init__(self, name: str, major: int, minor: int, total: int):
        self.name = name.encode().ljust(256, b"\0")
        self.major, self.minor, self.totalGlobalMem = major, minor, total


# -- the simulated machine --------------------------------------------------------------------


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.version = (13, 4)
        self.driver = 13000  # CUDA version the driver supports (cudaDriverGetVersion)
        self.runtime = 13000
        self.devices = [("NVIDIA H200", 9, 0, 141 << 30)]
        self.current = 0
        self.addresses = itertools.count(0x7F00_0000_0000, 1 << 24)
        self.device_mem: dict[int, bytearray] = {}  # base address -> bytes
        self.pinned: dict[int, ctypes.Array] = {}  # host address -> buffer (kept alive)
        self.streams: dict[int, dict] = {}  # address -> {"capturing": list | None, ...}
        self.graphs: dict[int, list] = {}  # cudaGraph_t address -> recorded ops
        self.execs: dict[int, list] = {}  # cudaGraphExec_t address -> ops
        self.fail_capture = False  # a test's switch: the next capture is invalidated
        self.last_error = cudaError_t.cudaSuccess  # what cudaGetLastError returns and clears
        self.calls: list[str] = []

    def device_view(self, address: int, nbytes: int) -> memoryview | None:
        """The device bytes [address, address + nbytes) inside one allocation, or None."""
        for base, buf in self.device_mem.items():
            if base <= address and address + nbytes <= base + len(buf):
                return memoryview(buf)[address - base : address - base + nbytes]
        return None

    def stream(self, stream) -> dict | None:
        if stream == 0 or stream is None:  # the legacy default stream
            return self.streams.setdefault(0, {"capturing": None, "invalid": False})
        if not isinstance(stream, cudaStream_t):
            return None
        return self.streams.get(stream._address)

    def enqueue(self, stream, op) -> cudaError_t:
        """Run ``op`` now, or record it when ``stream`` is capturing."""
        s = self.stream(stream)
        if s is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        if s["capturing"] is not None:
            s["capturing"].append(op)
            return OK
        return op()


STATE = _State()


def reset(**settings) -> _State:
    """A fresh machine (tests call this through tests/doubles.install)."""
    global STATE
    STATE = _State()
    for k, v in settings.items():
        setattr(STATE, k, v)
    return STATE


def _live_stream(stream) -> bool:
    return STATE.stream(stream) is not None


# -- the functions (each signature as the binding's docstring gives it) -----------------------


def cudaDriverGetVersion():
    return (OK, STATE.driver)


def cudaRuntimeGetVersion():
    return (OK, STATE.runtime)


def cudaGetDeviceCount():
    if STATE.driver == 0:
        return (cudaError_t.cudaErrorInsufficientDriver, None)
    if STATE.driver < STATE.runtime:
        return (cudaError_t.cudaErrorInsufficientDriver, None)
    if not STATE.devices:
        return (cudaError_t.cudaErrorNoDevice, None)
    return (OK, len(STATE.devices))


def cudaGetDevice():
    if not STATE.devices or STATE.driver < STATE.runtime:
        return (cudaError_t.cudaErrorNoDevice, None)
    return (OK, STATE.current)


def cudaGetDeviceProperties(device):
    if not isinstance(device, int) or not 0 <= device < len(STATE.devices):
        return (cudaError_t.cudaErrorInvalidDevice, None)
    return (OK, cudaDeviceProp(*STATE.devices[device]))


def cudaMalloc(size):
    if not isinstance(size, int) or size < 0:
        raise TypeError(f"size_t expected for size, got {size!r}")
    with STATE.lock:
        address = next(STATE.addresses)
        STATE.device_mem[address] = bytearray(size)
    return (OK, address)


def cudaFree(devPtr):
    with STATE.lock:
        if STATE.device_mem.pop(devPtr, None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
    return (OK,)


def cudaMallocHost(size):
    if not isinstance(size, int) or size < 0:
        raise TypeError(f"size_t expected for size, got {size!r}")
    buf = (ctypes.c_char * max(size, 1))()
    address = ctypes.addressof(buf)
    with STATE.lock:
        STATE.pinned[address] = buf
    return (OK, address)


def cudaFreeHost(ptr):
    with STATE.lock:
        if STATE.pinned.pop(ptr, None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
    return (OK,)


def cudaStreamCreate():
    with STATE.lock:
        address = next(STATE.addresses)
        STATE.streams[address] = {"capturing": None, "invalid": False}
    return (OK, cudaStream_t(address))


def cudaStreamDestroy(stream):
    with STATE.lock:
        if not isinstance(stream, cudaStream_t) or STATE.streams.pop(stream._address, None) is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
    return (OK,)


def cudaStreamSynchronize(stream):
    s = STATE.stream(stream)
    if s is None:
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    if s["capturing"] is not None:  # synchronising a capturing stream is illegal
        s["invalid"] = True
        return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
    return (OK,)


def cudaMemcpyAsync(dst, src, count, kind, stream):
    if not isinstance(kind, cudaMemcpyKind):
        raise TypeError(f"kind must be a cudaMemcpyKind, got {kind!r}")
    if not all(isinstance(v, int) for v in (dst, src, count)):
        raise TypeError("dst, src and count must be ints (addresses and a size)")
    if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:

        def op():
            view = STATE.device_view(dst, count)
            if view is None:
                return cudaError_t.cudaErrorInvalidValue
            view[:] = ctypes.string_at(src, count)
            return OK
    elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:

        def op():
            view = STATE.device_view(src, count)
            if view is None:
                return cudaError_t.cudaErrorInvalidValue
            ctypes.memmove(dst, bytes(view), count)
            return OK
    else:
        raise NotImplementedError(f"the double copies host<->device only, not {kind.name}")
    # an address never allocated is refused at the call, as the runtime checks it there
    device = dst if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else src
    if STATE.device_view(device, count) is None:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (STATE.enqueue(stream, op),)


def cudaStreamBeginCapture(stream, mode):
    if not isinstance(mode, cudaStreamCaptureMode):
        raise TypeError(f"mode must be a cudaStreamCaptureMode, got {mode!r}")
    s = STATE.stream(stream)
    if s is None or stream == 0:  # the legacy stream cannot be captured
        return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
    if s["capturing"] is not None:
        return (cudaError_t.cudaErrorIllegalAddress,)
    s["capturing"], s["invalid"] = [], bool(STATE.fail_capture)
    return (OK,)


def cudaStreamEndCapture(stream):
    s = STATE.stream(stream)
    if s is None or s["capturing"] is None:
        return (cudaError_t.cudaErrorInvalidValue, None)
    ops, invalid = s["capturing"], s["invalid"]
    s["capturing"], s["invalid"] = None, False
    if invalid:
        STATE.last_error = cudaError_t.cudaErrorStreamCaptureInvalidated
        return (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
    with STATE.lock:
        address = next(STATE.addresses)
        STATE.graphs[address] = ops
    return (OK, cudaGraph_t(address))


def cudaGetLastError():
    """(err,): the last error a runtime call left, which is then reset to success."""
    err, STATE.last_error = STATE.last_error, OK
    return (err,)


def invalidate_capture(stream) -> bool:
    """For the TensorRT double: an enqueue that cannot be captured invalidates the capture."""
    s = STATE.stream(stream)
    if s is not None and s["capturing"] is not None:
        s["invalid"] = True
        return True
    return False


def is_capturing(stream) -> bool:
    s = STATE.stream(stream)
    return s is not None and s["capturing"] is not None


def cudaGraphInstantiate(graph, flags):
    if not isinstance(graph, cudaGraph_t) or graph._address not in STATE.graphs:
        return (cudaError_t.cudaErrorInvalidValue, None)
    if not isinstance(flags, int):
        raise TypeError("flags must be an int")
    with STATE.lock:
        address = next(STATE.addresses)
        STATE.execs[address] = list(STATE.graphs[graph._address])
    return (OK, cudaGraphExec_t(address))


def cudaGraphDestroy(graph):
    if not isinstance(graph, cudaGraph_t) or STATE.graphs.pop(graph._address, None) is None:
        return (cudaError_t.cudaErrorInvalidValue,)
    return (OK,)


def cudaGraphExecDestroy(graphExec):
    if not isinstance(graphExec, cudaGraphExec_t) or graphExec._address not in STATE.execs:
        return (cudaError_t.cudaErrorInvalidValue,)
    del STATE.execs[graphExec._address]
    return (OK,)


def cudaGraphLaunch(graphExec, stream):
    if not isinstance(graphExec, cudaGraphExec_t) or graphExec._address not in STATE.execs:
        return (cudaError_t.cudaErrorInvalidValue,)
    if not _live_stream(stream):
        return (cudaError_t.cudaErrorInvalidResourceHandle,)
    for op in STATE.execs[graphExec._address]:
        err = op()
        if err != OK:
            return (err,)
    STATE.calls.append("cudaGraphLaunch")
    return (OK,)


def get_cuda_native_handle(obj) -> int:
    """cuda.bindings.utils.get_cuda_native_handle: the address a handle object wraps."""
    if not isinstance(obj, _Handle):
        raise TypeError("Unknown type: " + str(type(obj)))
    return obj._address


def utils_module() -> types.ModuleType:
    m = types.ModuleType("cuda.bindings.utils")
    m.get_cuda_native_handle = get_cuda_native_handle
    return m
