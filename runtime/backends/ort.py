"""ONNX Runtime backend: one InferenceSession per graph, created from verified bytes."""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ddpm_rt.backends import ort_cache
from ddpm_rt.bundle.io_spec import ORT_TYPES, GraphIO, TensorSpec
from ddpm_rt.errors import BackendError, InputError, first_line

# Bundles may not use external data: every byte a graph uses must be hashed. A graph loaded
# from /proc/self/fd/N looks for its external data in /proc/self/fd/ and finds nothing; one
# loaded from bytes would look in the working directory, so point that lookup at a folder
# that does not exist. Either way a graph that refers to external data fails to load.
_NO_EXTERNAL_DATA = os.path.join(tempfile.gettempdir(), f"ddpm-rt-no-external-data-{uuid.uuid4()}")
_DTYPE_OF = {v: k for k, v in ORT_TYPES.items()}


def _options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only; warnings would drown the progress bar
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", _NO_EXTERNAL_DATA
    )
    return opts


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
TRT_EP = "TensorrtExecutionProvider"


def _shapes(profile: dict, which: int) -> str:
    """One end of a profile in the TensorRT EP's option syntax: 'x:1x3x16x16,t:1x1'."""
    return ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in profile.items())


def provider_list(providers: list[str], sha256: str | None = None, trt: dict | None = None):
    """Providers with the options this runtime sets. The TensorRT execution provider keeps
    its engines and timing cache in the per-user cache (never in a bundle), in a folder per
    ONNX Runtime version (each onnxruntime-gpu release links its own TensorRT) and per
    graph sha256: the EP names engines from the model's file name, input and node-output
    names and versions, never its weights (``TRTGenerateId``,
    onnxruntime/core/providers/tensorrt/tensorrt_execution_provider_utils.h), and a graph
    loaded from /proc/self/fd/N or bytes has no telling name, so a retrained bundle of the
    same architecture would load the old model's engine. It gets explicit profile shapes
    from the bundle's I/O spec (``trt``: {"profile": ..., "qdq": ...}), so no batch falls
    outside what it built. Precision comes from the graph fed (``--unet-precision fp16`` or
    ``int8-qdq``); the Q/DQ graph also needs ``trt_int8_enable`` where the EP builds weakly
    typed networks (TensorRT refuses Q/DQ layers there without the INT8 flag: "Int8
    precision has been set for a layer or layer output, but int8 is not configured in the
    builder", microsoft/onnxruntime#13381); with Q/DQ nodes no calibration table is used
    (microsoft/onnxruntime#8969)."""
    out: list = []
    for p in providers:
        if p == TRT_EP:
            if trt is None or not sha256:
                raise BackendError("the TensorRT execution provider runs only the U-Net/decoder")
            folder = ort_cache.cache_root() / "ort-trt" / ort.__version__ / sha256
            opts = {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(folder),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(folder),
                "trt_profile_min_shapes": _shapes(trt["profile"], 0),
                "trt_profile_opt_shapes": _shapes(trt["profile"], 1),
                "trt_profile_max_shapes": _shapes(trt["profile"], 2),
            }
            if trt.get("qdq"):
                opts["trt_int8_enable"] = True
            out.append((p, opts))
        else:
            out.append(p)
    return out


def fell_back(asked: list[str], used: list[str]) -> list[str]:
    """The providers asked for that a session does not use (ONNX Runtime drops a provider
    whose libraries fail to load with only a warning, and runs on the next one)."""
    return [p for p in asked if p not in used]


def live_spec(name: str, sess: ort.InferenceSession) -> GraphIO:
    """The I/O of a loaded session, in the bundle's spec terms (dynamic dims as '?')."""

    def conv(args):
        return tuple(
            TensorSpec(
                a.name,
                _DTYPE_OF.get(a.type, a.type),
                tuple(d if isinstance(d, int) else "dynamic" for d in (a.shape or [])),
            )
            for a in args
        )

    return GraphIO(name, "", conv(sess.get_inputs()), conv(sess.get_outputs()))


class OrtBackend:
    name = "ort"

    def __init__(
        self,
        graphs: dict[str, Callable[[], AbstractContextManager[str | bytes]]],
        specs: dict[str, GraphIO] | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
        hashes: dict[str, str] | None = None,
        tensorrt_graphs: dict[str, dict] | None = None,
    ):
        """``graphs`` maps graph names to functions opening the verified ONNX graph (a context
        manager yielding a path to the verified open file, or the bytes);
        ``specs`` (graph name -> I/O spec) is what each live graph must agree with;
        ``tensorrt_graphs`` (graph name -> profile and Q/DQ flag) the graphs the TensorRT
        execution provider may take: the others run on the remaining providers."""
        if providers is not None and (
            isinstance(providers, str)
            or not isinstance(providers, (list, tuple))
            or not all(isinstance(p, str) for p in providers)
        ):
            raise InputError(
                "providers must be a list of ONNX Runtime provider names, "
                "e.g. ['CPUExecutionProvider']"
            )
        available = ort.get_available_providers()
        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in available]
        if missing or not providers:
            raise InputError(
                f"ONNX Runtime provider(s) not available: {', '.join(missing) or '(none given)'} "
                f"(available: {', '.join(available)})"
            )
        self.graphs = dict(graphs)
        self.specs = dict(specs or {})
        self.providers = providers
        self.threads = threads
        self.hashes = dict(hashes or {})
        self.tensorrt_graphs = dict(tensorrt_graphs or {})
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()  # sessions are created once, then shared by threads
        self._names: dict[str, list[str]] = {}
        self._accepted: dict[tuple, tuple] = {}  # (graph, input shapes) -> output shapes
        # on a GPU provider, device buffers are bound once per thread, graph and shapes
        self._gpu = {g: any(p in GPU_PROVIDERS for p in self.providers_for(g)) for g in self.graphs}
        self._bindings = threading.local()
        self._cached: dict[str, str] = {}  # graph -> the cache file its session was made from

    def session(self, graph: str) -> ort.InferenceSession:
        sess = self._sessions.get(graph)
        if sess is not None:
            return sess
        with self._lock:
            if graph not in self._sessions:
                self._sessions[graph] = self._create(graph)
            return self._sessions[graph]

    def _create(self, graph: str) -> ort.InferenceSession:
        if graph not in self.graphs:
            raise BackendError(f"no graph {graph!r} (have: {', '.join(self.graphs)})")
        opts = _options(self.threads)
        sha = self.hashes.get(graph)
        cacheable = sha and self.providers == ["CPUExecutionProvider"] and ort_cache.enabled()
        with self.graphs[graph]() as source, tempfile.TemporaryDirectory() as tmp:
            # the bundle's graph is verified (hashed) even when its optimised form is cached
            cached = ort_cache.lookup(sha, self.providers) if cacheable else None
            sess = None
            if cached:  # the optimised form of the graph with this verified sha256
                fast = _options(self.threads)
                fast.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                try:
                    sess = self._session(graph, cached, fast)
                    self._cached[graph] = str(ort_cache.entry(sha, self.providers)[0])
                except BackendError:  # a damaged entry: drop it, load the bundle's graph
                    ort_cache.discard(sha, self.providers)
            fresh = sess is None
            if fresh:
                if cacheable:
                    opts.optimized_model_filepath = os.path.join(tmp, "optimised.onnx")
                sess = self._session(graph, source, opts)
            spec = self.specs.get(graph)
            if spec is not None:
                why = spec.mismatch(live_spec(graph, sess))
                if why:
                    raise BackendError(
                        f"graph {graph!r} ({spec.file}{self._origin(graph)}) does not match "
                        f"the bundle's I/O spec: {why}"
                    )
            # cached only once it has passed the checks: a refused graph is never reused
            if fresh and cacheable and os.path.exists(opts.optimized_model_filepath):
                ort_cache.store(sha, self.providers, Path(opts.optimized_model_filepath))
        return sess

    def _origin(self, graph: str) -> str:
        """Where an error's graph came from, when it is the optimised-graph cache."""
        path = self._cached.get(graph)
        return f", as optimised in the cache at {path}" if path else ""

    def providers_for(self, graph: str) -> list[str]:
        """The providers ``graph`` runs on: the TensorRT EP only for graphs it can take."""
        if graph in self.tensorrt_graphs:
            return list(self.providers)
        return [p for p in self.providers if p != TRT_EP] or ["CPUExecutionProvider"]

    def _session(self, graph: str, source, opts) -> ort.InferenceSession:
        asked = self.providers_for(graph)
        try:
            providers = provider_list(
                asked, self.hashes.get(graph), self.tensorrt_graphs.get(graph)
            )
            for _, o in (p for p in providers if isinstance(p, tuple)):
                # the TensorRT provider's engine folder must exist before it writes there
                Path(o["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                # ORT warns of a provider it cannot load and goes on without it; that is
                # checked below and is an error, with one line, and nothing printed before
                warnings.simplefilter("ignore", UserWarning)
                # enable_fallback=0: no retry on the next provider when creation fails (ORT
                # would print the error to stdout and go on; the C ABI prints nothing)
                sess = ort.InferenceSession(
                    source, sess_options=opts, providers=providers, enable_fallback=0
                )
        except Exception as e:  # ORT raises its own untyped errors
            msg = first_line(e)
            if "xternal data" in msg:
                msg = "it refers to external data files, which bundles may not use"
            raise BackendError(f"ONNX Runtime cannot load graph {graph!r}: {msg}") from None
        missing = fell_back(asked, sess.get_providers())
        if missing:
            raise BackendError(
                f"ONNX Runtime could not use {', '.join(missing)} for graph {graph!r} (it "
                f"would have run on {', '.join(sess.get_providers())}); check the CUDA, cuDNN "
                "and TensorRT libraries with 'ddpm-rt doctor'"
            )
        # no silent switch to another provider when a run fails (ORT would print and retry)
        sess.disable_fallback()
        return sess

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session(graph)
        try:
            if self._gpu[graph]:
                outs = self._run_bound(graph, sess, feeds)
            else:
                outs = sess.run(None, feeds)
        except Exception as e:
            raise BackendError(
                f"ONNX Runtime failed running {graph}{self._origin(graph)}: {first_line(e)}"
            ) from None
        result = dict(zip(self._output_names(graph, sess), outs, strict=True))
        spec = self.specs.get(graph)
        if spec is not None:
            # the full check once per input shape; then only that the outputs' shapes and
            # dtypes are the ones it accepted
            seen = tuple((k, v.shape) for k, v in feeds.items())
            got = tuple((k, v.shape, v.dtype) for k, v in result.items())
            if self._accepted.get((graph, seen)) != got:
                why = check_outputs(spec, feeds, result)
                if why:
                    raise BackendError(f"graph {graph!r} returned {why}{self._origin(graph)}")
                self._accepted[(graph, seen)] = got
        return result

    def _run_bound(self, graph: str, sess, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run with IO binding: device input/output buffers for these shapes are allocated
        once (per thread) and reused every step; inputs are copied in place."""
        table = getattr(self._bindings, "table", None)
        if table is None:
            table = self._bindings.table = {}
        key = (graph, tuple((k, v.shape, v.dtype.str) for k, v in feeds.items()))
        entry = table.get(key)
        if entry is None:
            binding = sess.io_binding()
            values = {}
            for name, arr in feeds.items():
                values[name] = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
                binding.bind_ortvalue_input(name, values[name])
            for name in self._output_names(graph, sess):
                binding.bind_output(name, "cuda", 0)
            entry = table[key] = (binding, values)
        else:
            binding, values = entry
            for name, arr in feeds.items():
                values[name].update_inplace(np.ascontiguousarray(arr))
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _output_names(self, graph: str, sess) -> list[str]:
        names = self._names.get(graph)
        if names is None:
            names = self._names[graph] = [o.name for o in sess.get_outputs()]
        return names


def check_outputs(spec: GraphIO, feeds: dict, outputs: dict) -> str | None:
    """Why ``outputs`` disagree with the spec given these ``feeds`` (None when they agree):
    every output present, with its dtype, and each dimension equal to the spec's fixed size
    or to the size the same-named axis has in the inputs."""
    axes: dict[str, int] = {}
    for t in spec.inputs:
        if t.name in feeds:
            for d, n in zip(t.shape, np.shape(feeds[t.name]), strict=False):
                if isinstance(d, str):
                    axes.setdefault(d, n)
    for t in spec.outputs:
        if t.name not in outputs:
            return f"no output {t.name!r}"
        arr = outputs[t.name]
        if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(t.dtype):
            return (
                f"output {t.name!r} of dtype {getattr(arr, 'dtype', type(arr))}, expected {t.dtype}"
            )
        want = tuple(axes.get(d, -1) if isinstance(d, str) else d for d in t.shape)
        if arr.ndim != len(want) or any(
            w not in (-1, n) for w, n in zip(want, arr.shape, strict=False)
        ):
            return f"output {t.name!r} of shape {arr.shape}, expected {want}"
    return None
