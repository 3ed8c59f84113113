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
symmetric Q/DQ graph (the GPU path), so this file is named after its format.

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

from ddpm_rt.bundle import MANIFEST, Bundle
from ddpm_rt.errors import DdpmRtError, InputError
from ddpm_rt.fileio import atomic_write
from ddpm_rt.io_spec import unet_io
from ddpm_rt.noise import ImageNoise
from ddpm_rt.pipeline import Generator
from ddpm_rt.samplers import make_sampler, sample_loop
from ddpm_rt.schedule import timestep_input
from ddpm_rt.tolerances import TOLERANCES

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


def record(gen: Generator, contexts: np.ndarray, every: int, batch: int = 16) -> list[dict]:
    """(x_t, t/T, c) feeds from DDPM trajectories, at every ``every``-th timestep (and t=1)."""
    T = gen.schedule.timesteps
    feeds = []
    for start in range(0, len(contexts), batch):
        c = contexts[start : start + batch]

        def eps_fn(x, t, c=c):
            if t % every == 0 or t == 1:
                tt = np.full((len(x), 1), timestep_input(t, T), dtype=np.float32)
                feeds.append({"x": x.copy(), "t": tt, "c": c})
            return gen.eps(x, t, c)

        noise = ImageNoise(start, range(len(c)))
        sample_loop(
            eps_fn, make_sampler("ddpm", gen.schedule), (len(c), *gen.bundle.image_shape), noise
        )
    return feeds


def quantize_bundle(
    bundle_dir: str | Path, force: bool = False, log: Callable[[str], None] = print
) -> dict:
    """Add the CPU int8 U-Net to a bundle (rewrites its manifest: the digest changes)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    bundle, m = _open_for_variant(bundle_dir, "int8", INT8_GRAPH, force, log)
    if bundle is None:
        return m["unet_precisions"]["int8"]
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

    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        (Path(tmp) / "fp32.onnx").write_bytes(bundle.graph_bytes("unet"))
        quant_pre_process(str(Path(tmp) / "fp32.onnx"), str(pre))
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=OPS,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        data = out.read_bytes()
    cos, ts = _parity(gen, data, check)
    late = ts > gen.schedule.timesteps // 10
    tol = TOLERANCES[("ort", "int8")]
    log(
        f"int8 vs fp32 eps on held-out x_t: mean cosine {cos.mean():.5f}, min {cos.min():.4f} "
        f"(t > T/10: min {cos[late].min():.5f})"
    )
    if cos.mean() < tol["min_mean_cosine"] or cos[late].min() < tol["min_cosine_late"]:
        raise QuantizeError(f"int8 U-Net misses its parity check {tol}")
    entry = {
        "graph": INT8_GRAPH,
        "format": INT8_FORMAT,
        "calibration": {"prompts": len(prompts), "batches": len(calib), "every_timesteps": every},
        "checks": {
            "heldout_batches": len(check),
            "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min()),
            "min_cosine_t_over_T_10": float(cos[late].min()),
        },
    }
    _add_variant(bundle, m, "int8", INT8_FILE, data, entry, log)
    return entry


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
