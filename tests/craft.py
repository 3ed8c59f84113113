"""Tiny hand-made ONNX graphs and bundles, for hostile-input tests.

Each graph honours (or deliberately breaks) the bundle I/O contract of ddpm_rt.bundle.io_spec, so a
test can make a U-Net whose noise is NaN from some step on, a text encoder whose embedding
is not unit length, or a graph whose outputs disagree with its manifest -- and check that the
runtime refuses it with a clear message instead of writing a black image.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ddpm_rt.bundle.io_spec import text_encoder_io, unet_io

C, H, W = 3, 8, 8
OPSET = 17


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)
    )


def _vi(name: str, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def unet_graph(
    d: int,
    scale: float = 0.1,
    bad_value: float | None = None,
    bad_below_t: float = 2.0,
    out_shape: list | None = None,
    in_names=("x", "t", "c"),
    declared_out: list | None = None,
) -> bytes:
    """eps = scale * x (+ bad_value where t < bad_below_t), optionally reshaped to out_shape.

    With ``bad_value`` NaN/Inf/1e30 and ``bad_below_t`` 2 (t/T is at most 1) every step is
    broken; with 0.5 only the second half of the steps.
    """
    x, t, c = in_names
    nodes = [
        _const("k", np.float32(scale)),
        helper.make_node("Mul", [x, "k"], ["y0"]),
        # use c and t so they stay graph inputs
        helper.make_node("ReduceSum", [c], ["csum"], keepdims=1),
        _const("zero", np.float32(0.0)),
        helper.make_node("Mul", ["csum", "zero"], ["c0"]),
        helper.make_node("Unsqueeze", ["c0", "axes23"], ["c0b"]),
        _const("axes23", np.array([2, 3], np.int64)),
        helper.make_node("Add", ["y0", "c0b"], ["y1"]),
    ]
    last = "y1"
    if bad_value is not None:
        nodes += [
            _const("thr", np.float32(bad_below_t)),
            helper.make_node("Less", [t, "thr"], ["mask"]),
            helper.make_node("Unsqueeze", ["mask", "axes23"], ["maskb"]),
            _const("bad", np.float32(bad_value)),
            helper.make_node("Where", ["maskb", "bad", last], ["y2"]),
        ]
        last = "y2"
    if out_shape is not None:
        nodes += [
            _const("shape", np.array(out_shape, np.int64)),
            helper.make_node("ReduceMean", [last], ["red"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Expand", ["red", "shape"], ["y3"]),
        ]
        last = "y3"
    nodes.append(helper.make_node("Identity", [last], ["eps"]))
    # put Constant nodes first (topological order)
    nodes.sort(key=lambda n: n.op_type != "Constant")
    graph = helper.make_graph(
        nodes,
        "unet",
        [
            _vi(x, TensorProto.FLOAT, ["batch", C, H, W]),
            _vi(t, TensorProto.FLOAT, ["batch", 1]),
            _vi(c, TensorProto.FLOAT, ["batch", d]),
        ],
        [_vi("eps", TensorProto.FLOAT, declared_out or ["batch", C, H, W])],
    )
    return _model(graph)


def text_graph(d: int, norm: float = 1.0, bad_value: float | None = None, out_dim=None) -> bytes:
    """embedding = a fixed vector of the given norm (NaN/Inf with bad_value), one row per batch."""
    out_dim = out_dim or d
    vec = np.zeros((1, out_dim), np.float32)
    vec[0, 0] = norm
    if bad_value is not None:
        vec[0, 1 % out_dim] = bad_value
    nodes = [
        _const("vec", vec),
        helper.make_node("Cast", ["input_ids"], ["idf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["idf", "mf"], ["s"]),
        _const("ax1", np.array([1], np.int64)),
        helper.make_node("ReduceSum", ["s", "ax1"], ["rs"], keepdims=1),  # (B, 1)
        _const("zero", np.float32(0.0)),
        helper.make_node("Mul", ["rs", "zero"], ["z"]),
        helper.make_node("Add", ["z", "vec"], ["embedding"]),  # (B, D)
    ]
    nodes.sort(key=lambda n: n.op_type != "Constant")
    graph = helper.make_graph(
        nodes,
        "text",
        [
            _vi("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            _vi("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [_vi("embedding", TensorProto.FLOAT, ["batch", out_dim])],
    )
    return _model(graph)


def _model(graph) -> bytes:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def file_entry(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_bundle(
    out: Path,
    unet: bytes | None = None,
    text: bytes | None = None,
    tokenizer: bytes | None = None,
    labels: int = 4,
    timesteps: int = 20,
) -> Path:
    """A complete, valid bundle (label-conditioned, or text-conditioned with ``text``)."""
    out.mkdir(parents=True, exist_ok=True)
    d = 8 if text is not None else labels
    unet = unet if unet is not None else unet_graph(d)
    files = {"unet.onnx": unet}
    graphs = {"unet": unet_io(C, H, W, d).to_dict()}
    if text is not None:
        cond = {
            "kind": "text",
            "context_dim": d,
            "text": {
                "max_tokens": 16,
                "embedding_dim": d,
                "tokenizer": "tokenizer.json",
                "default_precision": "fp32",
                "graphs": {"fp32": "text_encoder"},
            },
        }
        files["text_encoder.onnx"] = text
        files["tokenizer.json"] = tokenizer
        graphs["text_encoder"] = text_encoder_io(d).to_dict()
    else:
        cond = {
            "kind": "label",
            "context_dim": d,
            "label_names": [f"thing {i}" for i in range(labels)],
        }
    for name, data in files.items():
        (out / name).write_bytes(data)
    manifest = {
        "schema_version": 1,
        "image": {"channels": C, "height": H, "width": W},
        "schedule": {
            "kind": "linear",
            "timesteps": timesteps,
            "beta_start": 1e-4,
            "beta_end": 0.02,
        },
        "conditioning": cond,
        "graphs": graphs,
        "files": {name: file_entry(data) for name, data in files.items()},
    }
    write_manifest(out, manifest)
    return out


def read_manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))


def rehash(bundle: Path, name: str) -> None:
    """Re-sign a changed file in the manifest, as a crafted bundle would."""
    m = read_manifest(bundle)
    m["files"][name] = file_entry((bundle / name).read_bytes())
    write_manifest(bundle, m)


def decoder_graph(
    c: int, h: int, w: int, size: int, bad_value: float | None = None, out_size: int | None = None
) -> bytes:
    """A stand-in latent decoder: image = clip(nearest-upsampled channel mean of the latent)
    on all three colours, (B, 3, out_size, out_size) (``size`` unless given); ``bad_value``
    (NaN, Inf) is added everywhere."""
    out_size = out_size or size
    nodes = [
        helper.make_node("ReduceMean", ["latent"], ["m"], axes=[1], keepdims=1),
        _const("scales", np.array([1, 1, out_size / h, out_size / w], np.float32)),
        helper.make_node("Resize", ["m", "", "scales"], ["up"], mode="nearest"),
        _const("rgb", np.array([1, 3, 1, 1], np.int64)),
        helper.make_node("Expand", ["up", "rgb"], ["y0"]),
        _const("lo", np.float32(-1.0)),
        _const("hi", np.float32(1.0)),
        helper.make_node("Clip", ["y0", "lo", "hi"], ["y1"]),
    ]
    last = "y1"
    if bad_value is not None:
        nodes += [
            _const("bad", np.float32(bad_value)),
            helper.make_node("Add", [last, "bad"], ["y2"]),
        ]
        last = "y2"
    nodes.append(helper.make_node("Identity", [last], ["image"]))
    nodes.sort(key=lambda n: n.op_type != "Constant")
    graph = helper.make_graph(
        nodes,
        "decoder",
        [_vi("latent", TensorProto.FLOAT, ["batch", c, h, w])],
        [_vi("image", TensorProto.FLOAT, ["batch", 3, out_size, out_size])],
    )
    return _model(graph)
