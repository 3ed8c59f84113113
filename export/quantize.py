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
four is held out to check the result against fp32 (cosine of eps over all timesteps, the
tolerance table's ``("ort", "int8")`` entry, which says why it is a cosine).
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddpm_rt.bundle.bundle import MANIFEST, Bundle
from ddpm_rt.bundle.fileio import atomic_write
from ddpm_rt.bundle.io_spec import unet_io
from ddpm_rt.errors import DdpmRtError, InputError
from ddpm_rt.generator import Generator
from ddpm_rt.tolerances import TOLERANCES
from ddpm_rt.tools.parity import record

INT8_FILE = "unet.int8-qoperator-u8s8.onnx"
INT8_GRAPH = "unet_int8"
INT8_FORMAT = (
    "ONNX Runtime QOperator; uint8 activations (asymmetric), int8 per-channel weights; "
    "Conv, ConvTranspose, MatMul, Gemm quantised; static MinMax calibration"
)
OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]


class QuantizeError(DdpmRtError):
    """The quantised graph misses its parity check against fp32."""


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
# TensorRT's explicit quantisation takes int8 Q/DQ with zero-point 0 only; weights
# per-channel along the output-channel axis. ConvTranspose stays float: its per-channel
# axis (1) is the one layouts disagree on, and it is 2 of the graph's ~30 layers.
QDQ_OPS = ["Conv", "MatMul", "Gemm"]


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
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
    bundle, m = _open_for_variant(bundle_dir, precision, graph_name, force, log)
    if bundle is None:
        return m["unet_precisions"][precision]
    gen = Generator(bundle)
    prompts, contexts = calibration_contexts(gen)
    every = max(1, gen.schedule.timesteps // 40)
    feeds = record(gen, contexts, every)
    calib = [f for k, f in enumerate(feeds) if k % 4 != 3]
    check = [f for k, f in enumerate(feeds) if k % 4 == 3]
    log(
        f"calibrating on {len(calib)} batches of real x_t ({len(prompts)} prompts, every "
        f"{every}th of {gen.schedule.timesteps} timesteps); {len(check)} held out"
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    if qdq:
        options = dict(
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QDQ_OPS,
            activation_type=QuantType.QInt8,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                # TensorRT quantises int8 only: a bias quantised to int32 (ONNX Runtime's
                # default) would be a DequantizeLinear it cannot take; it stays float.
                "QuantizeBias": False,
                "DedicatedQDQPair": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            },
        )
    else:
        options = dict(
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=OPS,
            activation_type=QuantType.QUInt8,
        )
    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        (Path(tmp) / "fp32.onnx").write_bytes(bundle.graph_bytes("unet"))
        quant_pre_process(str(Path(tmp) / "fp32.onnx"), str(pre))
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            per_channel=True,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            **options,
        )
        data = out.read_bytes()
    if qdq:
        why = qdq_problems(data)
        if why:
            raise QuantizeError(f"the Q/DQ graph is not what TensorRT consumes: {why}")
    cos, ts = _parity(gen, data, check)
    late = ts > gen.schedule.timesteps // 10
    tol = TOLERANCES[("ort", "int8")]
    log(
        f"{precision} vs fp32 eps on held-out x_t: mean cosine {cos.mean():.5f}, "
        f"min {cos.min():.4f} (t > T/10: min {cos[late].min():.5f})"
    )
    if cos.mean() < tol["min_mean_cosine"] or cos[late].min() < tol["min_cosine_late"]:
        raise QuantizeError(f"{precision} U-Net misses its parity check {tol}")
    entry = {
        "graph": graph_name,
        "format": fmt,
        "calibration": {"prompts": len(prompts), "batches": len(calib), "every_timesteps": every},
        "checks": {
            "heldout_batches": len(check),
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "min_cosine_t_over_T_10": float(cos[late].min()),
        },
    }
    _add_variant(bundle, m, precision, file, data, entry, log)
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
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    bundle, m = _open_for_variant(bundle_dir, "fp16", FP16_GRAPH, force, log)
    if bundle is None:
        return m["unet_precisions"]["fp16"]
    gen = Generator(bundle)
    _, contexts = calibration_contexts(gen, limit=16)
    feeds = record(gen, contexts, max(1, gen.schedule.timesteps // 20))
    model = convert_float_to_float16(
        onnx.load_from_string(bundle.graph_bytes("unet")), keep_io_types=True
    )
    data = model.SerializeToString()
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    errs = []
    for f in feeds:
        ref = gen.backend.run("unet", f)["eps"].astype(np.float64)
        got = sess.run(["eps"], f)[0].astype(np.float64)
        errs.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    errs = np.array(errs)
    tol = TOLERANCES[("ort", "fp16")]["max_rel_l2"]
    log(
        f"fp16 vs fp32 eps on recorded x_t: relative L2 error max {errs.max():.2e}, "
        f"mean {errs.mean():.2e} (limit {tol:g})"
    )
    if errs.max() > tol:
        raise QuantizeError(f"fp16 U-Net misses its parity check: {errs.max():.2e} > {tol:g}")
    entry = {
        "graph": FP16_GRAPH,
        "format": FP16_FORMAT,
        "checks": {
            "batches": len(feeds),
            "max_rel_l2": float(errs.max()),
            "mean_rel_l2": float(errs.mean()),
        },
    }
    _add_variant(bundle, m, "fp16", FP16_FILE, data, entry, log)
    return entry


def _open_for_variant(bundle_dir, precision: str, graph: str, force: bool, log):
    """(bundle, a copy of its manifest to extend), or (None, manifest) when the bundle
    already has this variant and ``force`` is off."""
    bundle = Bundle.load(bundle_dir)
    m = copy.deepcopy(bundle.manifest)
    if not force and graph in m["graphs"]:
        log(f"{bundle.path} already has an {precision} U-Net (pass --force to redo it)")
        return None, m
    return bundle, m


def _add_variant(
    bundle: Bundle, m: dict, precision: str, file: str, data: bytes, entry: dict, log
) -> None:
    atomic_write(bundle.path / file, lambda f: f.write(data))
    c, h, w = bundle.image_shape
    m["graphs"][entry["graph"]] = {**unet_io(c, h, w, bundle.context_dim).to_dict(), "file": file}
    m["files"][file] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    m["unet_precisions"] = {
        "fp32": {"graph": "unet"},
        **m.get("unet_precisions", {}),
        precision: entry,
    }
    atomic_write(
        bundle.path / MANIFEST, lambda f: f.write((json.dumps(m, indent=2) + "\n").encode())
    )
    Bundle.load(bundle.path)  # the runtime's own validation, as a final check
    log(f"wrote {bundle.path / file} ({len(data) / 1e6:.1f} MB) and {bundle.path / MANIFEST}")


def _parity(gen: Generator, data: bytes, feeds: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine between int8 and fp32 eps per image, and each image's timestep."""
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    cos, ts = [], []
    for f in feeds:
        ts.extend(np.rint(f["t"][:, 0] * gen.schedule.timesteps).astype(int))
        ref = gen.backend.run("unet", f)["eps"].reshape(len(f["x"]), -1).astype(np.float64)
        got = sess.run(["eps"], f)[0].reshape(len(f["x"]), -1).astype(np.float64)
        cos.extend((ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)))
    return np.array(cos), np.array(ts)
