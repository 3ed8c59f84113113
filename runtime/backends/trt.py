"""TensorRT backend (no PyTorch): the U-Net, and a latent bundle's decoder, run as engines
from the per-user cache.

* Engines come only from :class:`~ddpm_rt.backends.engine_cache.EngineCache` (built on this
  machine by ``ddpm-rt build-engines``), chosen by the sha256 of the bundle's verified ONNX
  graph; before use, the record's TensorRT version, GPU and graph hash are compared with this
  machine's and a mismatch says exactly what to rebuild. The plan's bytes are checked against
  its record.
* Device memory and streams through cuda-python (``cuda.bindings.runtime``). Each thread that
  calls :meth:`run` gets its own execution context, stream, device buffers (sized for the
  profile's largest shapes, allocated once) and pinned host buffers, so one ``Generator`` may
  serve several threads.
* Per call: ``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` (TensorRT
  10/11 name-based API); the sampling loop stays NumPy on the host, x_t in and eps out.
  Optional CUDA graphs (``DDPM_RT_CUDA_GRAPHS=1``): each input shape gets its own execution
  context, captured once after a first (warm-up) run at that shape and replayed after. A
  captured graph holds the launches of one context at one shape, and TensorRT's enqueue
  writes shape-dependent state into its context, so graphs of two shapes never share a
  context (a batch above the profile runs slices of two shapes). A failed capture turns
  graphs off for that shape, with a log line, and the run goes on without them.
* A batch larger than the engine's profile is run in slices of the profile's maximum.
* Every output's shape is checked against the bundle's I/O spec (batch and fixed dimensions).
* The text encoder stays on ONNX Runtime (see :mod:`ddpm_rt.backends.trt_build`); NaN/Inf in eps is
  caught by the sampling loop's per-step check, which names the step, backend and precision,
  and in the decoder's image by ``Generator.to_pixels``.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import numpy as np

from ddpm_rt.backends import gpu
from ddpm_rt.backends.engine_cache import EngineCache
from ddpm_rt.bundle.io_spec import GraphIO
from ddpm_rt.errors import BackendError

log = logging.getLogger(__name__)
_NO_GRAPH = "no graph"  # capture failed at this shape: run without a graph


class _Context:
    """One execution context with its stream and buffers (used by one thread)."""

    def __init__(self, engine, rt, names, max_shapes, dtypes):
        self.rt = rt
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (GPU memory?)")
        self.stream = gpu.check(rt.cudaStreamCreate(), "cudaStreamCreate")
        self.device, self.host = {}, {}
        self.graph = None  # the instantiated CUDA graph of this context's shape, or _NO_GRAPH
        for name in names:
            n = int(np.prod(max_shapes[name]))
            nbytes = n * dtypes[name].itemsize
            self.device[name] = gpu.check(rt.cudaMalloc(nbytes), "cudaMalloc")
            ptr = gpu.check(rt.cudaMallocHost(nbytes), "cudaMallocHost")  # pinned
            ctype = ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtypes[name]))
            self.host[name] = np.ctypeslib.as_array(ctypes.cast(ptr, ctype), (n,))
            self.context.set_tensor_address(name, int(self.device[name]))

    def free(self) -> None:
        rt = self.rt
        if self.graph not in (None, _NO_GRAPH):
            rt.cudaGraphExecDestroy(self.graph)
        for name, ptr in self.device.items():
            rt.cudaFree(ptr)
            rt.cudaFreeHost(self.host[name].ctypes.data)
        rt.cudaStreamDestroy(self.stream)
        self.device, self.host, self.graph = {}, {}, None


class TrtBackend:
    name = "trt"

    def __init__(
        self,
        bundle,
        text_backend,
        cache: EngineCache | None = None,
        cuda_graphs: bool = False,
    ):
        """``bundle``: the loaded (verified) Bundle; ``text_backend``: the ONNX Runtime
        backend that runs the text encoder; U-Net and decoder engines are looked up in
        ``cache``."""
        from ddpm_rt.backends.trt_build import current_platform, trt_precision

        self.trt = gpu.tensorrt()
        self.rt = gpu.cudart()
        self.bundle = bundle
        self.text = text_backend
        self.cache = cache or EngineCache()
        self.cuda_graphs = cuda_graphs
        self.here = current_platform()
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(self._logger)
        self._engines: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._contexts: list[_Context] = []
        # the graphs that run as engines: graph -> (role, TensorRT precision)
        self._engine_of = {g: ("unet", trt_precision(p)) for p, g in bundle.unet_precisions.items()}
        self._engine_of.update({g: ("decoder", p) for p, g in bundle.decoder_precisions.items()})

    @property
    def providers(self) -> list[str]:
        """The text encoder's ONNX Runtime providers."""
        return self.text.providers

    @property
    def threads(self) -> int | None:
        return self.text.threads

    # -- sessions -----------------------------------------------------------------------
    def session(self, graph: str):
        """Load (once) what ``graph`` runs on: an engine for a U-Net or decoder graph, else
        ONNX Runtime."""
        if graph not in self._engine_of:
            return self.text.session(graph)
        with self._lock:
            if graph not in self._engines:
                self._engines[graph] = self._load(graph)
            return self._engines[graph]

    def _load(self, graph: str) -> dict:
        trt = self.trt
        role, precision = self._engine_of[graph]
        if role == "decoder":
            from ddpm_rt.backends.trt_build import decoder_graph_for

            decoder_graph_for(self.bundle, precision)  # why TensorRT cannot take it, if not
        spec: GraphIO = self.bundle.graphs[graph]
        sha = self.bundle.manifest["files"][spec.file]["sha256"]
        record = self.cache.select(self.here, sha, precision, role)
        engine = self._runtime.deserialize_cuda_engine(self.cache.read_plan(self.here, record))
        if engine is None:
            raise BackendError(
                f"TensorRT could not load the {precision} engine for {graph}; rebuild it with "
                "'ddpm-rt build-engines BUNDLE --force'"
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != spec.input_names or outputs != spec.output_names:
            raise BackendError(
                f"the engine for {graph} has inputs {inputs} and outputs {outputs}, the bundle's "
                f"spec {spec.input_names} and {spec.output_names}"
            )
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        for t in (*spec.inputs, *spec.outputs):
            if dtypes[t.name] != np.dtype(t.dtype):
                raise BackendError(
                    f"the engine for {graph} has {t.name} of dtype {dtypes[t.name]}, "
                    f"the spec {t.dtype}"
                )
        # the profile's largest input shapes, and the output shape they imply (same batch)
        max_shapes = {n: tuple(engine.get_tensor_profile_shape(n, 0)[2]) for n in inputs}
        batch = max_shapes[inputs[0]][0]
        for t in spec.outputs:
            max_shapes[t.name] = (batch, *t.shape[1:])
        return {
            "engine": engine,
            "inputs": inputs,
            "outputs": outputs,
            "dtypes": dtypes,
            "max_shapes": max_shapes,
            "max_batch": batch,
            "record": record,
            "spec": spec,
        }

    def _context(self, graph: str, shapes: tuple) -> _Context:
        """This thread's context for ``graph``: one for every batch shape when CUDA graphs
        are on (buffers sized for that shape), else one for all (sized for the profile)."""
        per_thread = getattr(self._local, "contexts", None)
        if per_thread is None:
            per_thread = self._local.contexts = {}
        key = (graph, shapes) if self.cuda_graphs else graph
        ctx = per_thread.get(key)
        if ctx is None:
            e = self.session(graph)
            sizes = e["max_shapes"]
            if self.cuda_graphs:
                batch = shapes[0][1][0]
                sizes = {n: (batch, *s[1:]) for n, s in sizes.items()}
            ctx = _Context(e["engine"], self.rt, e["inputs"] + e["outputs"], sizes, e["dtypes"])
            per_thread[key] = ctx
            with self._lock:
                self._contexts.append(ctx)
        return ctx

    # -- running ------------------------------------------------------------------------
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph not in self._engine_of:
            return self.text.run(graph, feeds)
        e = self.session(graph)
        n = len(next(iter(feeds.values())))
        step = e["max_batch"]
        if n <= step:
            return self._run(graph, e, feeds)
        parts = [
            self._run(graph, e, {k: v[i : i + step] for k, v in feeds.items()})
            for i in range(0, n, step)
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in e["outputs"]}

    def _run(self, graph: str, e: dict, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rt = self.rt
        shapes = tuple((k, tuple(feeds[k].shape)) for k in e["inputs"])
        ctx = self._context(graph, shapes)
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in e["inputs"]:
            arr = np.ascontiguousarray(feeds[name], dtype=e["dtypes"][name])
            ctx.host[name][: arr.size] = arr.ravel()
            gpu.check(
                rt.cudaMemcpyAsync(
                    ctx.device[name], ctx.host[name].ctypes.data, arr.nbytes, h2d, ctx.stream
                ),
                "cudaMemcpyAsync",
            )
            if not ctx.context.set_input_shape(name, arr.shape):
                raise BackendError(f"the engine for {graph} does not take {name} of {arr.shape}")
        if ctx.graph not in (None, _NO_GRAPH):
            gpu.check(rt.cudaGraphLaunch(ctx.graph, ctx.stream), "cudaGraphLaunch")
        else:
            if not ctx.context.execute_async_v3(gpu.handle(ctx.stream)):
                raise BackendError(f"TensorRT failed running {graph}")
            if self.cuda_graphs and ctx.graph is None:
                # capture after a first run at this shape (TensorRT's advice: the first
                # enqueue may allocate or change state, which a capture cannot hold)
                ctx.graph = self._capture(ctx, graph, shapes)
        shapes_out = {}
        batch = shapes[0][1][0]
        for t in e["spec"].outputs:
            name = t.name
            shape = tuple(ctx.context.get_tensor_shape(name))
            want = [batch, *t.shape[1:]]
            if len(shape) != len(want) or any(
                isinstance(w, int) and w != d for w, d in zip(want, shape, strict=True)
            ):
                raise BackendError(
                    f"the engine for {graph} gives {name} of shape {list(shape)}, the spec "
                    f"{[w if isinstance(w, int) else '?' for w in want]}"
                )
            size = int(np.prod(shape))
            nbytes = size * e["dtypes"][name].itemsize
            gpu.check(
                rt.cudaMemcpyAsync(
                    ctx.host[name].ctypes.data, ctx.device[name], nbytes, d2h, ctx.stream
                ),
                "cudaMemcpyAsync",
            )
            shapes_out[name] = shape
        gpu.check(rt.cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize")
        return {
            k: ctx.host[k][: int(np.prod(shape))].reshape(shape).copy()
            for k, shape in shapes_out.items()
        }

    def _capture(self, ctx: _Context, graph: str, shapes: tuple):
        """Capture this context's launch as a CUDA graph; on failure, _NO_GRAPH and a log
        line (the run itself has already been done without a graph)."""
        rt = self.rt
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        try:
            # as trtexec does (samples/common/sampleInference.cpp at v10.3.0 L956-989): the
            # warm-up enqueue finished, then the capture; a failed one ends the capture and
            # clears the CUDA error it left, and the run goes on without a graph
            gpu.check(rt.cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize")
            gpu.check(rt.cudaStreamBeginCapture(ctx.stream, mode), "cudaStreamBeginCapture")
            launched = ctx.context.execute_async_v3(gpu.handle(ctx.stream))
            # end the capture whatever happened, so the stream is usable again
            g = gpu.check(rt.cudaStreamEndCapture(ctx.stream), "cudaStreamEndCapture")
            if not launched:
                rt.cudaGraphDestroy(g)
                raise BackendError("TensorRT's enqueue failed during the capture")
            try:
                return gpu.check(rt.cudaGraphInstantiate(g, 0), "cudaGraphInstantiate")
            finally:
                rt.cudaGraphDestroy(g)
        except BackendError as e:
            rt.cudaGetLastError()
            log.warning(
                "CUDA graph capture failed for %s at %s (%s); running that shape without one",
                graph,
                ", ".join(f"{k}{list(v)}" for k, v in shapes),
                e,
            )
            return _NO_GRAPH

    def close(self) -> None:
        with self._lock:
            for ctx in self._contexts:
                ctx.free()
            self._contexts = []
