"""What kind of int8 graph a bundle graph is, read from its bytes without the ``onnx`` package
(the runtime does not depend on it).

TensorRT takes int8 only as explicit quantisation: QuantizeLinear/DequantizeLinear pairs
around float operators ("Q/DQ"). ONNX Runtime's CPU int8 graphs use QOperator nodes
(``QLinearConv``, ``ConvInteger``, ``MatMulInteger``, ``DynamicQuantizeLinear``), for which
TensorRT's ONNX parser has no importer. A bundle's int8 decoder may be either, so the
TensorRT paths ask :func:`not_qdq` before they build or hand it to the TensorRT execution
provider.

Only the top-level graph's node types are read: ModelProto.graph (field 7) ->
GraphProto.node (field 1, repeated) -> NodeProto.op_type (field 4), in protobuf's wire
format (varint keys; wire types 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
"""

from __future__ import annotations

from ddpm_rt.errors import BundleError


def _qoperator(op: str) -> bool:
    """QLinearConv, QLinearMatMul, ...; ConvInteger, MatMulInteger; DynamicQuantizeLinear."""
    return op.startswith("QLinear") or op.endswith("Integer") or op == "DynamicQuantizeLinear"


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise BundleError("damaged ONNX graph: a varint runs past the end")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _fields(data: bytes):
    """(field number, wire type, value) of one protobuf message; a length-delimited value
    is its bytes, the others are skipped (None)."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
            yield field, wire, None
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise BundleError("damaged ONNX graph: a field runs past the end")
            yield field, wire, data[i : i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            yield field, wire, None
        else:
            raise BundleError(f"damaged ONNX graph: wire type {wire} (groups are not ONNX)")


def op_types(data: bytes) -> set[str]:
    """The operator types of the top-level graph of the ONNX model ``data``."""
    ops = set()
    for field, wire, graph in _fields(data):
        if field == 7 and wire == 2:  # ModelProto.graph
            for gfield, gwire, node in _fields(graph):
                if gfield == 1 and gwire == 2:  # GraphProto.node
                    for nfield, nwire, value in _fields(node):
                        if nfield == 4 and nwire == 2:  # NodeProto.op_type
                            ops.add(value.decode(errors="replace"))
    return ops


def not_qdq(data: bytes) -> str | None:
    """Why the graph ``data`` is not an int8 graph TensorRT takes (explicit Q/DQ
    quantisation), or None when it is one."""
    ops = op_types(data)
    qop = sorted(o for o in ops if _qoperator(o))
    if qop:
        return f"it is a QOperator int8 graph ({', '.join(qop)}), which TensorRT does not take"
    if not {"QuantizeLinear", "DequantizeLinear"} <= ops:
        return "it has no QuantizeLinear/DequantizeLinear nodes"
    return None
