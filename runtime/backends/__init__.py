"""Inference backends. Each has the same small interface::

    backend.run(graph_name, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]

A backend loads each graph from what the bundle verified (the verified open file or its
bytes, never a path a bundle names), compares the live graph's inputs and outputs with the
bundle's I/O spec when it creates the session, and checks every output's shape and dtype
against the spec.
"""

from __future__ import annotations

from ddpm_rt.bundle.bundle import Bundle
from ddpm_rt.errors import InputError

BACKENDS = ("ort", "trt")


def make_backend(
    name: str,
    bundle: Bundle,
    providers: list[str] | None = None,
    threads: int | None = None,
    engine_cache=None,
):
    """``ort``: ONNX Runtime with ``providers`` (default CPU). ``trt``: the U-Net (and a
    latent bundle's decoder) on TensorRT engines from ``engine_cache`` (an EngineCache,
    default the per-user one), the text encoder on ONNX Runtime with ``providers``."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")
    if name == "trt":
        import os

        from ddpm_rt.backends.trt import TrtBackend

        return TrtBackend(
            bundle,
            make_backend("ort", bundle, providers, threads),
            engine_cache,
            # replay each batch shape's launch as a CUDA graph (opt-in: captured graphs hold
            # device memory per shape)
            cuda_graphs=os.environ.get("DDPM_RT_CUDA_GRAPHS", "") not in ("", "0"),
        )
    from ddpm_rt.backends.ort import OrtBackend

    return OrtBackend(
        {g: (lambda g=g: bundle.open_verified(bundle.graphs[g].file)) for g in bundle.graphs},
        specs=bundle.graphs,
        providers=providers,
        threads=threads,
        hashes={
            g: bundle.manifest["files"][spec.file]["sha256"] for g, spec in bundle.graphs.items()
        },
        tensorrt_graphs=tensorrt_graphs(bundle) if _asks_tensorrt(providers) else {},
    )


def _asks_tensorrt(providers) -> bool:
    """Whether ONNX Runtime's TensorRT provider is asked for (only then are the graphs it
    may take worked out: that reads an int8 decoder's graph). Malformed ``providers`` are
    OrtBackend's to refuse, with its message."""
    return isinstance(providers, (list, tuple)) and "TensorrtExecutionProvider" in providers


def tensorrt_graphs(bundle: Bundle) -> dict[str, dict]:
    """The graphs ONNX Runtime's TensorRT execution provider may take, each with its
    optimisation profile (from the bundle's I/O spec) and whether it is a Q/DQ int8 graph:
    every U-Net variant but the CPU's QOperator int8 ones, and a latent bundle's decoder
    variants (its int8 one only when it is a Q/DQ graph, see
    :func:`ddpm_rt.bundle.graph_ops.not_qdq`). Never the text encoder: its dynamic-int8
    graph (DynamicQuantizeLinear, MatMulInteger) is not TensorRT's, and it runs once per
    prompt."""
    from ddpm_rt.backends.trt_build import DEFAULT_MAX_IMAGES
    from ddpm_rt.bundle.graph_ops import not_qdq
    from ddpm_rt.bundle.io_spec import profile_shapes, unet_batch_range

    cpu_int8 = ("int8", "distilled-int8")  # QOperator graphs
    unets = {g: p for p, g in bundle.unet_precisions.items() if p not in cpu_int8}
    decoders = {g: p for p, g in bundle.decoder_precisions.items()}
    out = {}
    for g, spec in bundle.graphs.items():
        if g in unets:
            # guidance doubles the rows; a guidance-distilled graph (takes w) makes one per image
            batch = unet_batch_range(DEFAULT_MAX_IMAGES, guidance="w" not in spec.input_names)
            qdq = unets[g].endswith("int8-qdq")
        elif g in decoders:
            batch = unet_batch_range(DEFAULT_MAX_IMAGES, guidance=False)  # one row per image
            qdq = decoders[g] == "int8"
            if qdq and not_qdq(bundle.graph_bytes(g)):
                continue  # a QOperator int8 decoder stays on the CUDA/CPU providers
        else:
            continue
        out[g] = {"profile": profile_shapes(spec, batch), "qdq": qdq}
    return out
