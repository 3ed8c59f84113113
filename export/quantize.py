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
from ddpm_rt.parity import compare, record
from ddpm_rt.tolerances import TOLERANCES

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
) -> dict:
    """Add an int8 U-Net to a bundle (rewrites its manifest: the digest changes).

    ``precision`` ``int8``: the CPU graph (QOperator, u8 activations, fastest on ONNX
    Runtime's x86 CPU); ``int8-qdq``: the symmetric Q/DQ graph for TensorRT (also runs, more
    slowly, on ONNX Runtime's CPU, which is how it is checked here)."""
    qdq = precision == "int8-qdq"
    graph_name, file, fmt = (
        (QDQ_GRAPH, QDQ_FILE, QDQ_FORMAT)
        if qdq
        else (
            INT8_GRAPH,
            INT8_FILE,
            INT8_FORMAT,
        )
    )
    bundle, m = open_for_variant(bundle_dir, precision, graph_name, force, log, file=file)
    if bundle is None:
        return m["unet_precisions"][precision]
    gen = Generator(bundle)
    prompts, contexts = calibration_contexts(gen)
    every = max(1, gen.schedule.timesteps // 40)
    feeds = _record_finite(gen, contexts, every, precision)
    calib = [f for k, f in enumerate(feeds) if k % 4 != 3]
    check = [f for k, f in enumerate(feeds) if k % 4 == 3]
    log(
        f"calibrating on {len(calib)} batches of real x_t ({len(prompts)} prompts, every "
        f"{every}th of {gen.schedule.timesteps} timesteps); {len(check)} held out"
    )
    data = static_int8(bundle.graph_bytes("unet"), calib, qdq)
    if qdq:
        why = qdq_problems(data)
        if why:
            raise QuantizeError(f"the Q/DQ graph is not what TensorRT consumes: {why}")
    figures = _check_variant(gen, precision, data, check, log)
    entry = {
        "graph": graph_name,
        "format": fmt,
        "calibration": {"prompts": len(prompts), "batches": len(calib), "every_timesteps": every},
        "checks": {"heldout_batches": len(check), **figures},
    }
    add_variant(bundle, m, precision, file, data, entry, log)
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
    bundle_dir: str | Path, force: bool = False, log: Callable[[str], None] = print
) -> dict:
    """Add an fp16 U-Net (for GPU backends; on this CPU it is slower than fp32).

    Measured on the shipped U-Net against fp32 on x_t recorded along real trajectories
    (relative L2 error of eps): everything in fp16, max 2.7e-3, mean 5.0e-4; keeping the
    GroupNorms (InstanceNormalization) in fp32, max 3.5e-3, mean 6.5e-4; also GELU, the
    same. Keeping ops in fp32 buys no accuracy on this model, so none are kept; the check
    below (the tolerance table's ``("ort", "fp16")``) guards a model where it would.
    """
    bundle, m = open_for_variant(bundle_dir, "fp16", FP16_GRAPH, force, log, file=FP16_FILE)
    if bundle is None:
        return m["unet_precisions"]["fp16"]
    gen = Generator(bundle)
    _, contexts = calibration_contexts(gen, limit=16)
    feeds = _record_finite(gen, contexts, max(1, gen.schedule.timesteps // 20), "fp16")
    data = fp16_graph(bundle.graph_bytes("unet"))
    figures = _check_variant(gen, "fp16", data, feeds, log)
    entry = {
        "graph": FP16_GRAPH,
        "format": FP16_FORMAT,
        "checks": {"batches": len(feeds), **figures},
    }
    add_variant(bundle, m, "fp16", FP16_FILE, data, entry, log)
    return entry


def _record_finite(gen: Generator, contexts: np.ndarray, every: int, precision: str) -> list:
    """Feeds recorded along the fp32 U-Net's own trajectories, refused before any work
    when they are not finite (a broken fp32 graph cannot be the reference)."""
    feeds = record(gen, contexts, every)
    if not all(np.isfinite(f["x"]).all() for f in feeds):
        raise QuantizeError(_NOT_FINITE.format(precision=precision))
    return feeds


_NOT_FINITE = (
    "the bundle's fp32 U-Net gives non-finite values along its own trajectories: no "
    "{precision} U-Net can be checked against it (the bundle is unchanged)"
)


def _check_variant(gen: Generator, precision: str, data: bytes, feeds: list[dict], log) -> dict:
    """The variant's eps against the bundle's fp32 U-Net on recorded x_t, judged as ``ddpm-rt
    doctor`` judges a backend: :func:`ddpm_rt.parity.compare` with the tolerance
    table's ``("ort", precision)`` entry. Returns its figures; raises
    :class:`QuantizeError` when it misses (or when fp32 itself is not finite there)."""
    import onnxruntime as ort

    T = gen.schedule.timesteps
    ref = [gen.backend.run("unet", f)["eps"] for f in feeds]
    if not all(np.isfinite(r).all() for r in ref):
        raise QuantizeError(_NOT_FINITE.format(precision=precision))
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = [sess.run(["eps"], f)[0] for f in feeds]
    ts = np.concatenate([np.rint(f["t"][:, 0] * T).astype(int) for f in feeds])
    key = ("ort", precision)
    ok, figures = compare(key, got, ref, ts, T)
    log(
        f"{precision} vs fp32 eps on {len(feeds)} batches of recorded x_t: "
        + ", ".join(f"{k} {v:.5g}" for k, v in figures.items())
        + f" (on {cpu_kernels.describe(cpu_kernels.family())})"
    )
    if not ok:
        raise QuantizeError(
            f"{precision} U-Net misses its parity check {TOLERANCES[key]}: {figures} "
            "(the bundle is unchanged)"
        )
    return {**figures, "cpu_family": cpu_kernels.family()}
