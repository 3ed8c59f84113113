"""Precision variants of a bundle's graphs (the U-Net's, a latent bundle's decoder's): the
conversions (static int8 with ONNX Runtime's quantisation tools, fp16 with its float16
converter) and the one way a variant is written into a bundle -- checked first, then the
graph and an extended manifest written atomically, validated by the runtime, and the bundle
left as it was when anything fails. Used by :mod:`.quantize` (U-Net) and
:mod:`.quantize_decoder`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path

from ddpm_rt.bundle.bundle import MANIFEST, Bundle
from ddpm_rt.bundle.fileio import atomic_write
from ddpm_rt.bundle.io_spec import decoder_io, unet_io
from ddpm_rt.bundle.manifest import GUIDANCE_DISTILLED, takes_w, validate_manifest
from ddpm_rt.errors import DdpmRtError

# The CPU format's quantised ops (module docstring of :mod:`.quantize`: what was measured).
# Relu and MaxPool stay uint8 when their input is quantised (ReLU folds into the producing
# QLinearConv's output range): the ReLU blocks' int8 graph has no float islands (issue 19).
OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm", "Relu", "MaxPool"]
# TensorRT's explicit quantisation takes int8 Q/DQ with zero-point 0 only; weights
# per-channel along the output-channel axis. ConvTranspose stays float: its per-channel
# axis (1) is the one layouts disagree on, and it is 2 of the graph's ~30 layers.
QDQ_OPS = ["Conv", "MatMul", "Gemm"]


# Why the CPU int8 graphs (this U-Net's, the text encoder's) keep their weights in 7 bits.
# ONNX Runtime's x86-64 u8 x s8 kernels without VNNI (AVX2, AVX-512BW: most AMD CPUs before
# Zen 4, many Intel desktops and laptops) multiply with VPMADDUBSW, which adds two u8 x s8
# products into a *saturating* int16: 2 x 255 x 127 = 64,770 overflows 32,767, so those
# CPUs compute another graph than a VNNI CPU (VPDPBUSD sums into int32) or ARM64 (SDOT/UDOT,
# or widening multiplies). MLAS runs u8 x u8 graphs through the same kernel (it flips the
# weights' sign bit), so U8U8 is no way out. With weights in [-64, 63] a pair sums to at
# most 2 x 255 x 64 = 32,640: nothing saturates, and every CPU family computes the same
# integers. Measured on the shipped U-Net (eps cosine vs fp32 on doctor's recorded x_t, mean
# / worst at t > T/10): 8-bit weights 0.9914 / 0.9956 with VNNI but 0.9874 / 0.9894 on an
# AVX2 CPU model (QEMU's Haswell: refused); 7-bit weights 0.9912 / 0.9948 on both, the same
# figures to every digit; the same ops, so the same speed (BENCHMARKS.md).
REDUCE_RANGE_WHY = "7-bit weights: no CPU family's int8 kernels saturate"


class QuantizeError(DdpmRtError):
    """The quantised graph misses its parity check against fp32."""


def static_int8(fp32: bytes, calib: list[dict], qdq: bool = False) -> bytes:
    """A graph quantised statically with ONNX Runtime's tools, MinMax-calibrated on the
    feeds ``calib``: QOperator u8/s8 on :data:`OPS` (the CPU format), or with ``qdq`` the
    symmetric Q/DQ graph on :data:`QDQ_OPS` (TensorRT's)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
            # 7-bit weights (int8 in [-64, 63]): see :data:`REDUCE_RANGE_WHY`.
            reduce_range=True,
        )
    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        (Path(tmp) / "fp32.onnx").write_bytes(fp32)
        # quant_pre_process writes scratch files into the working directory (and leaves
        # them there when its symbolic shape inference fails): run it inside tmp
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            quant_pre_process(str(Path(tmp) / "fp32.onnx"), str(pre))
        except Exception as e:  # its symbolic shape inference gave up on a graph
            if "symbolic shape inference" not in str(e):
                raise
            # ONNX's own shape inference (which still runs) knows every shape of the graphs
            # here; ORT's symbolic pass stops at the cascade decoder's projection
            quant_pre_process(str(Path(tmp) / "fp32.onnx"), str(pre), skip_symbolic_shape=True)
        finally:
            os.chdir(cwd)
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
    return data


def fp16_graph(fp32: bytes) -> bytes:
    """The graph in fp16, its inputs and outputs kept fp32 (:data:`FP16_FORMAT`)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(
        onnx.load_from_string(fp32), keep_io_types=True
    ).SerializeToString()


def open_for_variant(
    bundle_dir, precision: str, graph: str, force: bool, log, what="U-Net", file=None
):
    """(bundle, a copy of its manifest to extend), or (None, manifest) when the bundle
    already has this variant and ``force`` is off. A ``file`` of that name in the bundle
    folder that the manifest does not list is not the bundle's, so not ours to replace:
    refused before any work unless ``force``."""
    bundle = Bundle.load(bundle_dir)
    m = copy.deepcopy(bundle.manifest)
    if not force and graph in m["graphs"]:
        log(f"{bundle.path} already has an {precision} {what} (pass --force to redo it)")
        return None, m
    if not force and file is not None and file not in m["files"]:
        if os.path.lexists(bundle.path / file):
            raise QuantizeError(
                f"{bundle.path / file} exists but the manifest does not list it: pass --force "
                "to replace it (nothing was written)"
            )
    return bundle, m


def variant_slots(m: dict, decoder: bool) -> list[dict]:
    """The manifest objects that list a graph's precision variants: ``unet_precisions``
    (precision -> entry), or a latent bundle's ``latent.decoder.graphs`` (precision -> graph
    name) and ``latent.decoder.variants`` (precision -> entry)."""
    if not decoder:
        return [m.setdefault("unet_precisions", {})]
    dec = m["latent"]["decoder"]
    return [dec["graphs"], dec.setdefault("variants", {})]


def _drop_unused_requirement(m: dict) -> None:
    """``guidance-distilled`` leaves ``requires`` with the last U-Net that takes w."""
    any_w = any(takes_w(e) for e in m.get("unet_precisions", {}).values())
    if not any_w and GUIDANCE_DISTILLED in m.get("requires", []):
        m["requires"] = [r for r in m["requires"] if r != GUIDANCE_DISTILLED]
        if not m["requires"]:
            del m["requires"]


def add_variant(
    bundle: Bundle,
    m: dict,
    precision: str,
    file: str,
    data: bytes,
    entry: dict,
    log,
    decoder: bool = False,
) -> None:
    """Write the variant's graph and the extended manifest, validated before anything is
    written; no file the bundle uses is written over, and whatever fails the bundle is left
    loadable (as it was, or, when an older graph of this variant was replaced, without it).
    ``decoder``: a latent bundle's decoder variant, else the U-Net's."""
    graph, what = entry["graph"], "decoder" if decoder else "U-Net"
    old_file = m["graphs"].get(graph, {}).get("file")
    others = {g.get("file") for name, g in m["graphs"].items() if name != graph}
    if file in others or (file in m["files"] and file != old_file):
        raise QuantizeError(
            f"{bundle.path} already uses {file} for another purpose; the {precision} {what} "
            "would write over it (nothing was written)"
        )
    base = copy.deepcopy(m)  # the manifest without this variant
    if old_file is not None:
        del base["graphs"][graph]
        base["files"].pop(old_file, None)
        for slot in variant_slots(base, decoder):
            slot.pop(precision, None)
        _drop_unused_requirement(base)
    c, h, w = bundle.sample_shape  # the U-Net's: a latent bundle's latent
    w_input = takes_w(entry)  # issue 29
    io = (
        decoder_io(c, h, w, *bundle.image_shape[1:])
        if decoder
        else unet_io(c, h, w, bundle.context_dim, guidance_input=w_input)
    )
    new = copy.deepcopy(base)
    if w_input and GUIDANCE_DISTILLED not in new.get("requires", []):
        new["requires"] = [*new.get("requires", []), GUIDANCE_DISTILLED]
    new["graphs"][graph] = {**io.to_dict(), "file": file}
    new["files"][file] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if decoder:
        names, entries = variant_slots(new, decoder)
        names[precision], entries[precision] = graph, entry
    else:
        new["unet_precisions"] = {"fp32": {"graph": "unet"}, **new.get("unet_precisions", {})}
        new["unet_precisions"][precision] = entry
    texts = {}
    for name, manifest in (("base", base), ("new", new)):
        try:  # strict JSON: a NaN would make a manifest no runtime loads
            texts[name] = (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()
        except ValueError:
            raise QuantizeError(
                f"the {precision} {what}'s figures are not finite: {entry}"
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
