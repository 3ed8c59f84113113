"""Latent bundles with decoder variants, for the decoder's GPU-path tests: the latent
fixture's bundle copied with an fp16 decoder and an int8 one, as a Q/DQ graph (TensorRT's
form) or a QOperator graph (ONNX Runtime's CPU form)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from craft import file_entry, read_manifest, write_manifest


def with_decoders(src: Path, out: Path, variants: dict[str, bytes]) -> Path:
    """A copy of the latent bundle ``src`` with decoder graphs added, precision -> ONNX
    bytes, each named ``decoder_<precision>`` in ``decoder.<precision>.onnx``."""
    shutil.copytree(src, out)
    m = read_manifest(out)
    for precision, data in variants.items():
        name, file = f"decoder_{precision}", f"decoder.{precision}.onnx"
        (out / file).write_bytes(data)
        m["files"][file] = file_entry(data)
        m["graphs"][name] = {**m["graphs"]["decoder"], "file": file}
        m["latent"]["decoder"]["graphs"][precision] = name
    write_manifest(out, m)
    return out


def fp16(decoder: Path) -> bytes:
    """fp16 weights and activations, fp32 I/O (as ``ddpm-rt quantize`` makes the U-Net's)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load(decoder), keep_io_types=True).SerializeToString()


def qdq(decoder: Path) -> bytes:
    """Explicit int8 quantisation of the latent (QuantizeLinear -> DequantizeLinear, a
    symmetric int8 zero-point): a Q/DQ graph, the form TensorRT takes."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(decoder)
    for node in m.graph.node:
        node.input[:] = ["latent_dq" if i == "latent" else i for i in node.input]
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(np.float32(8.0 / 127), "latent_scale"),
            numpy_helper.from_array(np.int8(0), "latent_zero_point"),
        ]
    )
    qparams = ["latent_scale", "latent_zero_point"]
    qdq = [
        helper.make_node("QuantizeLinear", ["latent", *qparams], ["latent_q"]),
        helper.make_node("DequantizeLinear", ["latent_q", *qparams], ["latent_dq"]),
    ]
    nodes = qdq + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m.SerializeToString()


def qoperator(decoder: Path, tmp: Path) -> bytes:
    """ONNX Runtime's dynamic int8 (ConvInteger, DynamicQuantizeLinear): a CPU graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(decoder, tmp / "qop.onnx", weight_type=QuantType.QInt8)
    return (tmp / "qop.onnx").read_bytes()


def latent_variants(src: Path, d: Path) -> dict:
    """The latent bundle ``src`` as it is, with fp16 + Q/DQ int8 decoders, and with fp16 + a
    QOperator int8 decoder."""
    dec = src / "decoder.onnx"
    return {
        "plain": src,
        "qdq": with_decoders(src, d / "qdq", {"fp16": fp16(dec), "int8": qdq(dec)}),
        "qop": with_decoders(src, d / "qop", {"fp16": fp16(dec), "int8": qoperator(dec, d)}),
    }
