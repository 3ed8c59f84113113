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
backend: :func:`ddpm_rt.tools.parity.compare` with the tolerance table's ``("ort",
precision)`` entry (for int8, the cosine of eps; the entry says why). A bundle whose fp32
U-Net is not finite along its own trajectories is refused before calibrating, and nothing
is written until the new manifest has passed the runtime's validation: no file the bundle
uses is written over, and whatever fails the bundle is left loadable.
"""

from __future__ import annotations

import contextlib
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
from ddpm_rt.bundle.manifest import validate_manifest
from ddpm_rt.errors import DdpmRtError, InputError
from ddpm_rt.generator import Generator
from ddpm_rt.tolerances import TOLERANCES
from ddpm_rt.tools.parity import compare, record

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
    feeds = _record_finite(gen, contexts, every, precision)
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
    figures = _check_variant(gen, precision, data, check, log)
    entry = {
        "graph": graph_name,
        "format": fmt,
        "calibration": {"prompts": len(prompts), "batches": len(calib), "every_timesteps": every},
        "checks": {"heldout_batches": len(check), **figures},
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
    feeds = _record_finite(gen, contexts, max(1, gen.schedule.timesteps // 20), "fp16")
    model = convert_float_to_float16(
        onnx.load_from_string(bundle.graph_bytes("unet")), keep_io_types=True
    )
    data = model.SerializeToString()
    figures = _check_variant(gen, "fp16", data, feeds, log)
    entry = {
        "graph": FP16_GRAPH,
        "format": FP16_FORMAT,
        "checks": {"batches": len(feeds), **figures},
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
    """Write the variant's graph and the extended manifest, validated before anything is
    written; no file the bundle uses is written over, and whatever fails the bundle is left
    loadable (as it was, or, when an older graph of this variant was replaced, without it)."""
    graph = entry["graph"]
    old_file = m["graphs"].get(graph, {}).get("file")
    others = {g.get("file") for name, g in m["graphs"].items() if name != graph}
    if file in others or (file in m["files"] and file != old_file):
        raise QuantizeError(
            f"{bundle.path} already uses {file} for another purpose; the {precision} U-Net "
            "would write over it (nothing was written)"
        )
    base = copy.deepcopy(m)  # the manifest without this variant
    if old_file is not None:
        del base["graphs"][graph]
        base["files"].pop(old_file, None)
        base.get("unet_precisions", {}).pop(precision, None)
    c, h, w = bundle.sample_shape  # the U-Net's: a latent bundle's latent
    new = copy.deepcopy(base)
    new["graphs"][graph] = {**unet_io(c, h, w, bundle.context_dim).to_dict(), "file": file}
    new["files"][file] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    new["unet_precisions"] = {"fp32": {"graph": "unet"}, **new.get("unet_precisions", {})}
    new["unet_precisions"][precision] = entry
    texts = {}
    for name, manifest in (("base", base), ("new", new)):
        try:  # strict JSON: a NaN would make a manifest no runtime loads
            texts[name] = (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()
        except ValueError:
            raise QuantizeError(
                f"the {precision} U-Net's figures are not finite: {entry}"
            ) from None
        validate_manifest(json.loads(texts[name]))
    path = bundle.path / MANIFEST
    before = path.read_bytes()
    try:
        if old_file is not None:  # the old graph is replaced: first a manifest without it
            atomic_write(path, lambda f: f.write(texts["base"]))
        atomic_write(bundle.path / file, lambda f: f.write(data))
        atomic_write(path, lambda f: f.write(texts["new"]))
        Bundle.load(bundle.path, hash_all=True)  # the runtime's own validation, as a final check
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            atomic_write(path, lambda f: f.write(texts["base"] if old_file else before))
            (bundle.path / file).unlink(missing_ok=True)  # no manifest left lists it
        raise
    log(f"wrote {bundle.path / file} ({len(data) / 1e6:.1f} MB) and {path}")


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
    doctor`` judges a backend: :func:`ddpm_rt.tools.parity.compare` with the tolerance
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
    )
    if not ok:
        raise QuantizeError(
            f"{precision} U-Net misses its parity check {TOLERANCES[key]}: {figures} "
            "(the bundle is unchanged)"
        )
    return figures
