"""The CPU int8 U-Net: static quantisation with ONNX Runtime's tools, calibrated on real x_t.

Format (measured on the shipped U-Net, 2-core AVX-512 x86, batch 8, one run each, see
BENCHMARKS.md): ONNX Runtime's QOperator format with uint8 activations and per-channel
int8 weights, quantising Conv, ConvTranspose, MatMul and Gemm only -- 1.65-1.75x fp32 at
eps cosine 0.9997. Slower variants tried: the QDQ format with int8 activations (0.6x: ONNX
Runtime recommends int8/int8 for ARM, i.e. a Jetson's CPU, not for x86), per-tensor weights
(1.65x), also quantising Add/Mul (1.09x: GroupNorm and GELU stay float, and the extra
quantise/dequantise pairs around them eat the gain). For comparison, an fp16 conversion
(``onnxruntime.transformers.float16``, fp32 I/O) ran at 0.84-0.91x fp32 on this CPU. The
TensorRT int8 variant is a separate,
symmetric Q/DQ graph (the GPU path, ``--precision int8-qdq``), so each file is named after
its format.

Calibration: the fp32 bundle itself samples DDPM trajectories (all T steps) for many
prompts -- the training captions of ``export/captions.py`` for a text bundle, every label for
a label bundle -- and records (x_t, t, c) at timesteps spread over 1..T. One trajectory in
four is held out to check the result against fp32, judged as ``ddpm-rt doctor`` judges a
backend: :func:`ddpm_rt.parity.compare` with the tolerance table's ``("ort",
precision)`` entry (for int8, the cosine of eps; the entry says why). A bundle whose fp32
U-Net is not finite along its own trajectories is refused before calibrating, and nothing
is written until the new manifest has passed the runtime's validation: no file the bundle
uses is written over, and whatever fails the bundle is left loadable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddpm_rt.backends import cpu_kernels
from ddpm_rt.errors import InputError
from ddpm_rt.generator import Generator
from ddpm_rt.parity import compare, record_in_use
from ddpm_rt.tolerances import tolerance

from .variants import (  # noqa: F401 - OPS, QDQ_OPS, QuantizeError: this module's API too
    OPS,
    QDQ_OPS,
    QuantizeError,
    add_variant,
    fp16_graph,
    open_for_variant,
    static_int8,
)

INT8_FILE = "unet.int8-qoperator-u8s8.onnx"
INT8_GRAPH = "unet_int8"
INT8_FORMAT = (
    "ONNX Runtime QOperator; uint8 activations (asymmetric), int8 per-channel weights in 7 "
    "bits (reduce_range: no CPU family's kernels saturate); Conv, ConvTranspose, MatMul, Gemm "
    "quantised; static MinMax calibration"
)


def calibration_contexts(gen: Generator, limit: int = 96) -> tuple[list[str], np.ndarray]:
    kind = gen.bundle.conditioning["kind"]
    if kind == "text":
        from .captions import eval_captions

        prompts = eval_captions()
    elif kind == "label":
        prompts = gen.bundle.label_names
    else:
        raise InputError("int8 calibration needs a text or label bundle (prompts to sample)")
    prompts = prompts[:: max(1, len(prompts) // limit)][:limit]
    return prompts, np.stack([gen.context(p) for p in prompts])


QDQ_FILE = "unet.int8-qdq-s8s8.onnx"
QDQ_GRAPH = "unet_int8_qdq"
QDQ_FORMAT = (
    "ONNX QuantizeLinear/DequantizeLinear (QDQ); symmetric int8 activations and per-channel "
    "int8 weights, zero-point 0 (what TensorRT's explicit quantisation consumes); Conv, "
    "MatMul, Gemm quantised; static MinMax calibration"
)


def quantize_bundle(
    bundle_dir: str | Path,
    force: bool = False,
    log: Callable[[str], None] = print,
    precision: str = "int8",
    of: str = "fp32",
) -> dict:
    """Add an int8 U-Net to a bundle (rewrites its manifest: the digest changes).

    ``precision`` ``int8``: the CPU graph (QOperator, u8 activations, fastest on ONNX
    Runtime's x86 CPU); ``int8-qdq``: the symmetric Q/DQ graph for TensorRT (also runs, more
    slowly, on ONNX Runtime's CPU, which is how it is checked here). ``of``: the U-Net it is
    made from, ``fp32`` or the bundle's ``distilled`` one (:func:`variant_names`)."""
    qdq = precision == "int8-qdq"
    bundle, m, (key, graph_name, file) = _open_source(bundle_dir, precision, of, force, log)
    if bundle is None:
        return m["unet_precisions"][key]
    gen = Generator(bundle, unet_precision=of)
    prompts, contexts = calibration_contexts(gen)
    every = max(1, gen.schedule.timesteps // 40)
    feeds = _record_finite(gen, contexts, every, key)
    along = _along(gen, feeds)
    # a distilled U-Net's feeds come a trajectory batch at a time, one per distilled step:
    # hold out whole trajectories, so that every timestep is calibrated and checked
    per = len({float(f["t"][0, 0]) for f in feeds}) if along else 1
    calib = [f for k, f in enumerate(feeds) if (k // per) % 4 != 3]
    check = [f for k, f in enumerate(feeds) if (k // per) % 4 == 3]
    along = along or {"every_timesteps": every}
    log(
        f"calibrating on {len(calib)} batches of real x_t ({len(prompts)} prompts, "
        f"{_describe(along, gen.schedule.timesteps)}); {len(check)} held out"
    )
    data = static_int8(bundle.graph_bytes(gen.unet_graph), calib, qdq)
    if qdq:
        why = qdq_problems(data)
        if why:
            raise QuantizeError(f"the Q/DQ graph is not what TensorRT consumes: {why}")
    figures = _check_variant(gen, key, data, check, log)
    entry = {
        "graph": graph_name,
        "format": QDQ_FORMAT if qdq else INT8_FORMAT,
        **_inherited(m, of),
        "calibration": {"prompts": len(prompts), "batches": len(calib), **along},
        "checks": {"heldout_batches": len(check), **figures},
    }
    add_variant(bundle, m, key, file, data, entry, log)
    return entry


def qdq_problems(data: bytes) -> str | None:
    """Why a graph is not a symmetric int8 Q/DQ graph (None when it is): every
    QuantizeLinear/DequantizeLinear must have an int8 zero-point equal to 0, and there must
    be no QOperator (QLinear*, ConvInteger, MatMulInteger) nodes."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load_from_string(data).graph
    inits = {i.name: i for i in g.initializer}
    for node in g.node:
        if node.op_type.startswith("QLinear") or node.op_type.endswith("Integer"):
            return f"node {node.name} is {node.op_type} (QOperator), not Q/DQ"
    qdq = 0
    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qdq += 1
            if len(node.input) < 3 or node.input[2] not in inits:
                return f"{node.op_type} {node.name} has no constant zero-point"
            zp = inits[node.input[2]]
            if zp.data_type != onnx.TensorProto.INT8:
                return f"{node.op_type} {node.name} has a zero-point of type {zp.data_type}"
            if np.any(numpy_helper.to_array(zp) != 0):
                return f"{node.op_type} {node.name} has a non-zero zero-point"
    return None if qdq else "it has no QuantizeLinear/DequantizeLinear nodes"


FP16_FILE = "unet.fp16.onnx"
FP16_GRAPH = "unet_fp16"
FP16_FORMAT = (
    "fp16 weights and activations, fp32 inputs and outputs "
    "(onnxruntime.transformers.float16, keep_io_types)"
)


def fp16_bundle(
    bundle_dir: str | Path,
    force: bool = False,
    log: Callable[[str], None] = print,
    of: str = "fp32",
) -> dict:
    """Add an fp16 U-Net (for GPU backends; on this CPU it is slower than fp32), made from
    the ``of`` U-Net (``fp32`` or ``distilled``).

    Measured on the shipped U-Net against fp32 on x_t recorded along real trajectories
    (relative L2 error of eps): everything in fp16, max 2.7e-3, mean 5.0e-4; keeping the
    GroupNorms (InstanceNormalization) in fp32, max 3.5e-3, mean 6.5e-4; also GELU, the
    same. Keeping ops in fp32 buys no accuracy on this model, so none are kept; the check
    below (the tolerance table's ``("ort", "fp16")``) guards a model where it would.
    """
    bundle, m, (key, graph_name, file) = _open_source(bundle_dir, "fp16", of, force, log)
    if bundle is None:
        return m["unet_precisions"][key]
    gen = Generator(bundle, unet_precision=of)
    _, contexts = calibration_contexts(gen, limit=16)
    feeds = _record_finite(gen, contexts, max(1, gen.schedule.timesteps // 20), key)
    data = fp16_graph(bundle.graph_bytes(gen.unet_graph))
    figures = _check_variant(gen, key, data, feeds, log)
    entry = {
        "graph": graph_name,
        "format": FP16_FORMAT,
        **_inherited(m, of),
        "checks": {"batches": len(feeds), **_along(gen, feeds), **figures},
    }
    add_variant(bundle, m, key, file, data, entry, log)
    return entry


# The variants ``ddpm-rt quantize`` makes: precision -> (graph name, file) of the fp32
# U-Net's; a distilled U-Net's are named after it (:func:`variant_names`).
VARIANTS = {
    "int8": (INT8_GRAPH, INT8_FILE),
    "int8-qdq": (QDQ_GRAPH, QDQ_FILE),
    "fp16": (FP16_GRAPH, FP16_FILE),
}
SOURCES = ("fp32", "distilled")  # the U-Nets a variant is made from (``--of``)


def variant_names(precision: str, of: str = "fp32") -> tuple[str, str, str]:
    """(manifest precision, graph, file) of the ``precision`` variant of the ``of`` U-Net:
    ``unet_int8`` in ``unet.int8-qoperator-u8s8.onnx`` for the fp32 U-Net, and for the
    distilled one (issue 29) ``distilled-int8``, ``unet_distilled_int8`` in
    ``unet.distilled.int8-qoperator-u8s8.onnx``: one bundle holds both families."""
    graph, file = VARIANTS[precision]
    if of == "fp32":
        return precision, graph, file
    return (
        f"{of}-{precision}",
        graph.replace("unet", f"unet_{of}", 1),
        file.replace("unet.", f"unet.{of}.", 1),
    )


def _open_source(bundle_dir, precision: str, of: str, force: bool, log):
    """:func:`~.variants.open_for_variant` for the ``precision`` variant of the ``of``
    U-Net, with its names (:func:`variant_names`); a bundle without that U-Net is refused
    before any work."""
    if of not in SOURCES:
        raise InputError(f"a variant is made of the {' or '.join(SOURCES)} U-Net, not {of!r:.20}")
    names = variant_names(precision, of)
    bundle, m = open_for_variant(bundle_dir, names[0], names[1], force, log, file=names[2])
    if of != "fp32" and of not in m.get("unet_precisions", {}):
        raise InputError(
            f"{Path(bundle_dir)} has no {of} U-Net to convert to {precision} (add one with "
            "'ddpm-rt export STUDENT --out BUNDLE --as-variant')"
        )
    return bundle, m, names


def _inherited(m: dict, of: str) -> dict:
    """What a variant keeps of its source U-Net's entry: what it was distilled for and its
    own recommended settings (issue 29), so that the runtime runs it as it runs that one."""
    source = m.get("unet_precisions", {}).get(of) or {}
    return {k: source[k] for k in ("distilled", "recommended") if k in source}


def _along(gen: Generator, feeds: list[dict]) -> dict:
    """Where a distilled U-Net's feeds were recorded (its own timesteps, and the guidance
    scales a guidance-distilled one was fed), for the entry; {} for an ordinary U-Net."""
    if not gen.distilled:
        return {}
    T = gen.schedule.timesteps
    ts = {int(v) for f in feeds for v in np.rint(f["t"][:, 0] * T)}
    out: dict = {"timesteps": sorted(ts, reverse=True)}
    if gen.unet_takes_w:
        out["guidance"] = sorted({float(v) for f in feeds for v in f["w"][:, 0]})
    return out


def _describe(along: dict, T: int) -> str:
    """Where calibration feeds were recorded, for the log."""
    if "every_timesteps" in along:
        return f"every {along['every_timesteps']}th of {T} timesteps"
    return "; ".join(f"{k} {', '.join(f'{v:g}' for v in vs)}" for k, vs in along.items())


def _record_finite(gen: Generator, contexts: np.ndarray, every: int, precision: str) -> list:
    """Feeds recorded along the reference U-Net's own trajectories (``gen``'s: fp32, or the
    distilled one along its own few steps), refused before any work when they are not
    finite (a broken reference graph cannot be the reference)."""
    feeds = record_in_use(gen, contexts, every)
    if not all(np.isfinite(f["x"]).all() for f in feeds):
        raise QuantizeError(_NOT_FINITE.format(source=gen.unet_variant, precision=precision))
    return feeds


_NOT_FINITE = (
    "the bundle's {source} U-Net gives non-finite values along its own trajectories: no "
    "{precision} U-Net can be checked against it (the bundle is unchanged)"
)


def _check_variant(gen: Generator, precision: str, data: bytes, feeds: list[dict], log) -> dict:
    """The variant's eps against the U-Net it was made of (``gen``'s) on recorded x_t, judged
    as ``ddpm-rt doctor`` judges a backend: :func:`ddpm_rt.parity.compare` with the
    tolerance table's ``("ort", precision)`` entry (a distilled variant's: its base
    precision's). Returns its figures; raises :class:`QuantizeError` when it misses (or
    when the reference itself is not finite there)."""
    import onnxruntime as ort

    T = gen.schedule.timesteps
    ref = [gen.backend.run(gen.unet_graph, f)["eps"] for f in feeds]
    if not all(np.isfinite(r).all() for r in ref):
        raise QuantizeError(_NOT_FINITE.format(source=gen.unet_variant, precision=precision))
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = [sess.run(["eps"], f)[0] for f in feeds]
    ts = np.concatenate([np.rint(f["t"][:, 0] * T).astype(int) for f in feeds])
    key = ("ort", precision)
    ok, figures = compare(key, got, ref, ts, T)
    log(
        f"{precision} vs {gen.unet_variant} eps on {len(feeds)} batches of recorded x_t: "
        + ", ".join(f"{k} {v:.5g}" for k, v in figures.items())
        + f" (on {cpu_kernels.describe(cpu_kernels.family())})"
    )
    if not ok:
        raise QuantizeError(
            f"{precision} U-Net misses its parity check {tolerance(*key)}: {figures} "
            "(the bundle is unchanged)"
        )
    return {**figures, "cpu_family": cpu_kernels.family()}
