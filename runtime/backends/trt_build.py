"""``ddpm-rt build-engines``: TensorRT engines for a bundle's U-Net (and a latent bundle's
decoder), built on this machine.

Written against NVIDIA's documented Python API of TensorRT 10.x and 11.x (``Builder``,
``OnnxParser``, ``BuilderConfig``); where the two differ, the code says so. Networks are
strongly typed: the precision comes from the ONNX graph itself (the bundle's fp32, fp16 or
symmetric Q/DQ int8 U-Net), never from builder flags -- TensorRT 11 removed those
(``BuilderFlag.FP16``/``INT8``, calibrators; see NVIDIA's "Migrating from TensorRT 10.x to
11.x" guide). No version-compatible (lean-runtime) engines: they embed host code to run.

A latent bundle's decoder graph gets engines too, the same way: the batch axis of its
profile is images (no guidance rows, ``unet_batch_range(max_images, guidance=False)``), the
cache key is its own verified graph's sha256 and the flags. Its precision is the graph's, as
for the U-Net: fp16 is the bundle's ``decoder_fp16`` graph, never ``BuilderFlag.FP16`` on the
fp32 graph: weak typing is deprecated since TensorRT 10.12 (its release notes) and removed in
11.x (NVIDIA's "Removed Python APIs and Replacements": ``BuilderFlag.FP16`` -> strong typing),
and the flag would let TensorRT pick per-layer precisions that no check here has seen.
int8 is built only from a Q/DQ decoder graph (:func:`ddpm_rt.bundle.graph_ops.not_qdq`); a
QOperator one is skipped with the reason.

The text encoder is not built: it stays on ONNX Runtime (its dynamic-int8 graph uses
``DynamicQuantizeLinear``/``MatMulInteger``, which TensorRT's ONNX parser does not take, and
one run per prompt costs about a millisecond).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ddpm_rt import __version__
from ddpm_rt.backends import gpu
from ddpm_rt.backends.engine_cache import (
    BuildFlags,
    EngineCache,
    EngineRecord,
    Platform,
    engine_key,
)
from ddpm_rt.bundle.bundle import Bundle
from ddpm_rt.bundle.fileio import atomic_write
from ddpm_rt.bundle.graph_ops import not_qdq
from ddpm_rt.bundle.io_spec import profile_shapes, unet_batch_range
from ddpm_rt.errors import BackendError, InputError

TRT_PRECISIONS = ("fp32", "fp16", "int8")
# A distilled U-Net's (issue 29): the same three, made from the distilled graph.
TRT_UNET_PRECISIONS = (*TRT_PRECISIONS, "distilled", "distilled-fp16", "distilled-int8")
DEFAULT_MAX_IMAGES = 16  # images per U-Net call (the Generator's default batch size)


def trt_variant(precision: str) -> str:
    """The bundle's U-Net variant TensorRT builds for a TensorRT precision: int8 is the
    symmetric Q/DQ graph (``int8-qdq``, ``distilled-int8-qdq``), because the CPU's
    QOperator int8 graph is not what TensorRT's explicit quantisation consumes."""
    return f"{precision}-qdq" if precision.endswith("int8") else precision


def trt_precision(variant: str) -> str:
    """The TensorRT precision of a bundle's U-Net variant (the inverse of
    :func:`trt_variant`): ``int8-qdq`` -> ``int8``, ``distilled-int8-qdq`` ->
    ``distilled-int8``."""
    return variant.removesuffix("-qdq")


def unet_graph_for(bundle: Bundle, precision: str) -> str:
    """The bundle graph TensorRT builds for a U-Net precision (``int8-qdq`` names TensorRT's
    ``int8`` too): :func:`trt_variant`'s."""
    precision = trt_precision(precision)
    if precision not in TRT_UNET_PRECISIONS:
        raise InputError(f"TensorRT precision must be one of {', '.join(TRT_UNET_PRECISIONS)}")
    key = trt_variant(precision)
    variants = bundle.unet_precisions
    if key not in variants:
        if key == "distilled":
            how = "ddpm-rt export STUDENT --out BUNDLE --as-variant"
        elif key.startswith("distilled-"):
            base = key.removeprefix("distilled-")
            how = f"ddpm-rt quantize BUNDLE --precision {base} --of distilled"
        else:
            how = f"ddpm-rt quantize BUNDLE --precision {key}"
        raise InputError(f"this bundle has no {key} U-Net for TensorRT (make it with '{how}')")
    return variants[key]


def trt_precisions(variants: dict) -> tuple[str, ...]:
    """The TensorRT precisions a bundle with these U-Net variants can build."""
    return tuple(p for p in TRT_UNET_PRECISIONS if trt_variant(p) in variants)


def current_platform() -> Platform:
    """TensorRT version and the current GPU, or BackendError saying what is missing."""
    trt = gpu.tensorrt()
    rt = gpu.cudart()
    dev = gpu.check(rt.cudaGetDevice(), "current device")
    prop = gpu.check(rt.cudaGetDeviceProperties(dev), "device properties")
    return Platform(trt.__version__, gpu.device_name(prop), (int(prop.major), int(prop.minor)))


def decoder_graph_for(bundle: Bundle, precision: str) -> str:
    """The bundle graph TensorRT builds for a decoder precision, or InputError saying why
    there is none: not a latent bundle, no such variant, or an int8 decoder that is not a
    Q/DQ graph."""
    decoders = bundle.decoder_precisions
    if not decoders:
        raise InputError("this bundle has no decoder (it is a pixel bundle, not a latent one)")
    if precision not in TRT_PRECISIONS:
        raise InputError(f"TensorRT decoder precision must be one of {', '.join(TRT_PRECISIONS)}")
    if precision not in decoders:
        raise InputError(
            f"this bundle has no {precision} decoder for TensorRT (it has {', '.join(decoders)})"
        )
    graph = decoders[precision]
    if precision == "int8":
        why = not_qdq(bundle.graph_bytes(graph))
        if why:
            raise InputError(
                f"this bundle's int8 decoder {graph} is not for TensorRT: {why}; choose "
                "another --decoder-precision"
            )
    return graph


def trt_decoder_precisions(bundle: Bundle) -> tuple[tuple[str, ...], dict[str, str]]:
    """The decoder precisions TensorRT can build for this bundle, and why not for the others
    (empty for a pixel bundle)."""
    if not bundle.decoder_precisions:
        return (), {}
    ok, why = [], {}
    for p in TRT_PRECISIONS:
        try:
            decoder_graph_for(bundle, p)
            ok.append(p)
        except InputError as e:
            why[p] = str(e)
    return tuple(ok), why


def flags_for(
    bundle: Bundle,
    precision: str,
    max_images: int = DEFAULT_MAX_IMAGES,
    optimization_level: int = 3,
    workspace_mib: int = 1024,
    role: str = "unet",
) -> BuildFlags:
    """The build flags of the ``role`` graph (``unet`` or ``decoder``) of a precision. The
    U-Net's profile goes up to twice ``max_images`` rows (guidance runs conditional and
    unconditional rows in one call), a guidance-distilled U-Net's and the decoder's (it
    decodes finished latents) up to ``max_images``, one row per image."""
    if not 0 <= optimization_level <= 5:
        raise InputError(f"--optimization-level must be in 0..5, got {optimization_level}")
    if not 16 <= workspace_mib <= 1 << 20:
        raise InputError(f"--workspace-mib must be in 16..{1 << 20}, got {workspace_mib}")
    if role == "decoder":
        spec = bundle.graphs[decoder_graph_for(bundle, precision)]
        batch = unet_batch_range(max_images, guidance=False)
    else:
        spec = bundle.graphs[unet_graph_for(bundle, precision)]
        # guidance doubles the rows, but a guidance-distilled graph (it takes w, issue 29)
        # makes one row per image
        batch = unet_batch_range(max_images, guidance="w" not in spec.input_names)
    return BuildFlags(
        precision=precision,
        profile=profile_shapes(spec, batch),
        optimization_level=optimization_level,
        workspace_mib=workspace_mib,
    )


def wanted_decoders(bundle: Bundle, decoders, log) -> tuple[str, ...]:
    """The decoder precisions to build: ``"default"`` the bundle's default decoder precision
    (what a Generator decodes with unless told otherwise), ``"all"`` every one TensorRT can
    build -- each skipped with its reason logged --, or an explicit tuple, every one of which
    must be buildable (InputError otherwise). Nothing for a pixel bundle unless asked."""
    if decoders in ("default", "all"):
        buildable, why = trt_decoder_precisions(bundle)
        if not bundle.decoder_precisions:
            return ()
        if decoders == "default":
            default = bundle.latent["decoder"]["default_precision"]
            why = {default: why[default]} if default in why else {}
            buildable = tuple(p for p in buildable if p == default)
        for p, reason in why.items():
            log(f"skipping the {p} decoder engine: {reason}")
        return buildable
    for p in decoders:
        decoder_graph_for(bundle, p)
    return tuple(decoders)


def build_plan(onnx: bytes, flags: BuildFlags, timing_cache: Path | None, log) -> bytes:
    """Parse the ONNX graph and build a serialised engine (TensorRT's Python API)."""
    trt = gpu.tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # 10.x: strong typing is opt-in through NetworkDefinitionCreationFlag.STRONGLY_TYPED.
    # 11.x: always strongly typed; the flag is deprecated and ignored (TensorRT 11.0 Python
    # API, Builder page), so it is not passed there.
    net_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major < 11 else 0
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, flags.workspace_mib << 20)
    config.builder_optimization_level = flags.optimization_level
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in flags.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if timing_cache is not None:
        _use_timing_cache(config, timing_cache, log)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError("TensorRT failed to build the engine (see its messages above)")
    if timing_cache is not None:
        # None when no cache could be attached (see _use_timing_cache): nothing to save
        cache = config.get_timing_cache()
        if cache is not None:
            data = bytes(cache.serialize())
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(timing_cache, lambda f: f.write(data))
    return bytes(plan)


def _use_timing_cache(config, path: Path, log) -> None:
    """Attach the timing cache at ``path`` to ``config``, or a fresh one when that file is
    damaged or was made on another GPU. ``create_timing_cache`` wraps
    ``IBuilderConfig::createTimingCache`` (pyCore.cpp at v10.3.0 lines 239-242, v11.0 lines
    250-253), which gives None (nullptr) for data it cannot read; ``set_timing_cache``
    returns False for a cache from another device when ``ignore_mismatch`` is False
    (pyCoreDoc.h at v10.3.0 lines 1490-1502), and ``get_timing_cache`` then returns None."""
    old = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(old)
    except Exception:  # TensorRT's own error for unreadable data
        cache = None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if old:
        log(f"the timing cache {path} is damaged or from another GPU: starting a fresh one")
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        log("TensorRT gave no timing cache: building without one")


def build_engines(
    bundle: Bundle | str | Path,
    precisions: tuple[str, ...] = ("fp32",),
    cache: EngineCache | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    optimization_level: int = 3,
    workspace_mib: int = 1024,
    force: bool = False,
    log: Callable[[str], None] = print,
    decoders: tuple[str, ...] | str = "default",
) -> list[EngineRecord]:
    """Build (or reuse) one engine per U-Net precision, then one per decoder precision of a
    latent bundle (``decoders``: see :func:`wanted_decoders`); returns their records."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)  # hashes every file
    cache = cache or EngineCache()
    sizes = (max_images, optimization_level, workspace_mib)
    jobs = [(unet_graph_for(bundle, p), "U-Net", flags_for(bundle, p, *sizes)) for p in precisions]
    jobs += [
        (decoder_graph_for(bundle, p), "decoder", flags_for(bundle, p, *sizes, role="decoder"))
        for p in wanted_decoders(bundle, decoders, log)
    ]  # every argument checked before any work
    here = current_platform()
    return [
        _build_one(bundle, graph, role, flags, cache, here, force, log)
        for graph, role, flags in jobs
    ]


def _build_one(
    bundle: Bundle,
    graph: str,
    role: str,
    flags: BuildFlags,
    cache: EngineCache,
    here,
    force: bool,
    log: Callable[[str], None],
) -> EngineRecord:
    """Build the engine of one graph (or reuse the cached one); ``role``: U-Net or decoder."""
    precision = flags.precision
    what = precision if role == "U-Net" else f"{precision} {role}"
    sha = bundle.manifest["files"][bundle.graphs[graph].file]["sha256"]
    key = engine_key(sha, flags)
    with cache.lock(here, key):  # a second builder of this engine waits, then reuses it
        found = None if force else cache.lookup(here, sha, flags)
        if found is not None:
            plan, _ = cache.paths(here, key)
            log(f"reusing the cached {what} engine {plan}")
            return found
        first = next(iter(flags.profile.values()))  # every input's batch axis is the first
        rows = f"{first[0][0]}..{first[2][0]}"
        log(
            f"building the {what} engine for {graph} on {here.gpu_name} with TensorRT "
            f"{here.tensorrt_version} ({role} batch {rows})"
        )
        t0 = time.perf_counter()
        plan_data = build_plan(bundle.graph_bytes(graph), flags, cache.timing_cache_path(here), log)
        record = EngineRecord(
            graph=graph,
            onnx_sha256=sha,
            flags=flags,
            tensorrt_version=here.tensorrt_version,
            gpu_name=here.gpu_name,
            compute_capability=here.compute_capability,
            build_seconds=round(time.perf_counter() - t0, 2),
            ddpm_rt_version=__version__,
        )
        record = cache.store(here, record, plan_data)
        log(f"wrote {cache.paths(here, key)[0]} ({len(plan_data) / 1e6:.1f} MB)")
        return record
