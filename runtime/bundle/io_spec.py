"""One I/O spec per graph: names, dtypes, shapes with named dynamic axes.

The runtime owns it because the runtime is what must agree with every bundle. The exporter
writes graphs and manifests from it (input/output names, dynamic axes); bundle validation
compares the manifest's graph specs with it, and the backends compare the live graphs'
inputs and outputs with the manifest when a session is created, before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass

# Element types a bundle's graphs may declare, as ONNX Runtime spells them.
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # int for a fixed dimension, str naming a dynamic axis

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def mismatch(self, other: TensorSpec) -> str | None:
        """Why ``other`` cannot stand in for this spec (None when it can).

        Names, dtypes, ranks and fixed dimensions must agree; a dynamic axis here must be
        dynamic there too (its name does not matter).
        """
        if other.name != self.name:
            return f"is named {other.name!r}, expected {self.name!r}"
        if other.dtype != self.dtype:
            return f"{self.name!r} has dtype {other.dtype}, expected {self.dtype}"
        if len(other.shape) != len(self.shape):
            return f"{self.name!r} has rank {len(other.shape)}, expected {len(self.shape)}"
        for a, b in zip(self.shape, other.shape, strict=True):
            if isinstance(a, str) != isinstance(b, str) or (isinstance(a, int) and a != b):
                return f"{self.name!r} has shape {list(other.shape)}, expected {list(self.shape)}"
        return None


@dataclass(frozen=True)
class GraphIO:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

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

    @classmethod
    def from_dict(cls, name: str, d: dict) -> GraphIO:
        return cls(
            name,
            d["file"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )

    def mismatch(self, other: GraphIO) -> str | None:
        """Why ``other``'s inputs/outputs cannot stand in for this spec's (None when they can)."""
        for kind, mine, theirs in (
            ("inputs", self.inputs, other.inputs),
            ("outputs", self.outputs, other.outputs),
        ):
            if len(mine) != len(theirs):
                names = [t.name for t in theirs]
                return f"has {kind} {names}, expected {[t.name for t in mine]}"
            for a, b in zip(mine, theirs, strict=True):
                why = a.mismatch(b)
                if why:
                    return f"{kind[:-1]} {why}"
        return None


def unet_io(
    channels: int, height: int, width: int, context_dim: int, guidance_input: bool = False
) -> GraphIO:
    """(x[B,C,H,W] f32, t[B,1] f32 = timestep/T, c[B,D] f32) -> eps[B,C,H,W] f32.

    ``guidance_input``: a guidance-distilled U-Net (issue 29) takes a 4th input, w[B,1] f32,
    the classifier-free guidance scale, and outputs the guided eps in one call (no
    unconditional pass). Only such a graph has it."""
    inputs = [
        TensorSpec("x", "float32", ("batch", channels, height, width)),
        TensorSpec("t", "float32", ("batch", 1)),
        TensorSpec("c", "float32", ("batch", context_dim)),
    ]
    if guidance_input:
        inputs.append(TensorSpec("w", "float32", ("batch", 1)))
    return GraphIO(
        name="unet",
        file="unet.onnx",
        inputs=tuple(inputs),
        outputs=(TensorSpec("eps", "float32", ("batch", channels, height, width)),),
    )


def decoder_io(
    channels: int, height: int, width: int, image_height: int, image_width: int
) -> GraphIO:
    """A latent bundle's decoder: (latent[B,C,h,w] f32, as the U-Net samples it) ->
    image[B,3,H,W] f32 in [-1, 1]. The latent's un-scaling is inside the graph."""
    return GraphIO(
        name="decoder",
        file="decoder.onnx",
        inputs=(TensorSpec("latent", "float32", ("batch", channels, height, width)),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, image_height, image_width)),),
    )


def text_encoder_io(dim: int) -> GraphIO:
    """(input_ids[B,S] i64, attention_mask[B,S] i64) -> embedding[B,D] f32 (unit length)."""
    return GraphIO(
        name="text_encoder",
        file="text_encoder.onnx",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "sequence")),
        ),
        outputs=(TensorSpec("embedding", "float32", ("batch", dim)),),
    )


def profile_shapes(
    spec: GraphIO, batch: tuple[int, int, int], sequence: tuple[int, int, int] | None = None
) -> dict[str, list[list[int]]]:
    """TensorRT optimisation-profile shapes, input name -> [min, opt, max], from the spec:
    the ``batch`` axis takes ``batch`` (min, opt, max), a ``sequence`` axis ``sequence``,
    fixed dimensions stay as they are. Any other dynamic axis has no range to give it."""
    ranges = {"batch": batch, "sequence": sequence}
    for name, r in ranges.items():
        if r is not None and not (
            len(r) == 3 and all(isinstance(v, int) and v >= 1 for v in r) and r[0] <= r[1] <= r[2]
        ):
            raise ValueError(f"{name} range must be 1 <= min <= opt <= max, got {r}")
    out = {}
    for t in spec.inputs:
        shapes: list[list[int]] = [[], [], []]
        for d in t.shape:
            if isinstance(d, int):
                for s in shapes:
                    s.append(d)
            elif ranges.get(d) is not None:
                for s, v in zip(shapes, ranges[d], strict=True):
                    s.append(v)
            else:
                raise ValueError(f"input {t.name!r}: no range for its dynamic axis {d!r}")
        out[t.name] = shapes
    return out


def unet_batch_range(max_images: int, guidance: bool = True) -> tuple[int, int, int]:
    """U-Net batch (min, opt, max) for calls of up to ``max_images`` images: guidance runs
    the conditional and unconditional rows in one call, so its batch is twice as large."""
    if not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max images per call must be an integer >= 1, got {max_images!r}")
    rows = 2 * max_images if guidance else max_images
    return (1, max_images, rows)
