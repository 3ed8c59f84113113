"""What every exporter shares: the export stage's config, its error, and torch -> ONNX
tracing (checked by ``onnx.checker``). The U-Net's (:mod:`.onnx_export`), the decoder's
(:mod:`.decoder_export`) and the text encoder's (:mod:`.text_export`) exporters import it;
it imports none of them."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import onnx
import torch

from ddpm_rt.bundle.io_spec import GraphIO
from ddpm_rt.errors import DdpmRtError


class ExportError(DdpmRtError):
    """Export produced a graph that fails validation or parity."""


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str
    out: str
    opset: int = 17
    parity_batches: tuple[int, ...] = (1, 8)
    force: bool = False  # re-export even when a matching graph exists
    text_encoder: str | None = None  # default: the folder the checkpoint was trained with
    text_precisions: tuple[str, ...] = ("fp32", "int8")  # encoder graphs to ship
    autoencoder: str | None = None  # a latent U-Net's: default the folder it was trained with


def trace_to_onnx(model: torch.nn.Module, args: tuple, spec: GraphIO, opset: int) -> bytes:
    """TorchScript-based exporter: a plain, stable graph (Conv, Gemm, GroupNorm...)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            model,
            args,
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the {spec.name} graph: {e}") from None
    return buf.getvalue()
