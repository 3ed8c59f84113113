"""One I/O spec per graph: names, dtypes, dynamic axes (and later TensorRT profiles).

Read by the exporter (input/output names, dynamic axes), written into the bundle manifest,
and checked by the runtime's bundle validation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorIO:
    name: str
    dtype: str
    shape: tuple  # int, or a str naming a dynamic axis

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphIO:
    name: str
    file: str
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            for t in (*self.inputs, *self.outputs)
        }

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


def unet_io(channels: int, height: int, width: int, context_dim: int) -> GraphIO:
    """(x[B,C,H,W] f32, t[B,1] f32 = timestep/T, c[B,D] f32) -> eps[B,C,H,W] f32."""
    return GraphIO(
        name="unet",
        file="unet.onnx",
        inputs=(
            TensorIO("x", "float32", ("batch", channels, height, width)),
            TensorIO("t", "float32", ("batch", 1)),
            TensorIO("c", "float32", ("batch", context_dim)),
        ),
        outputs=(TensorIO("eps", "float32", ("batch", channels, height, width)),),
    )


def text_encoder_io(dim: int) -> GraphIO:
    """(input_ids[B,S] i64, attention_mask[B,S] i64) -> embedding[B,D] f32 (unit length)."""
    return GraphIO(
        name="text_encoder",
        file="text_encoder.onnx",
        inputs=(
            TensorIO("input_ids", "int64", ("batch", "sequence")),
            TensorIO("attention_mask", "int64", ("batch", "sequence")),
        ),
        outputs=(TensorIO("embedding", "float32", ("batch", dim)),),
    )
