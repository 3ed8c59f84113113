"""ONNX Runtime's GPU providers, checked on a CPU: what is asked of each session and what it
actually uses. onnxruntime-gpu lists the CUDA and TensorRT providers as available even
where their libraries (libcudart, libcudnn, libnvinfer) then fail to load; the session is
created anyway, on the next provider, with only a warning. This CPU build of onnxruntime
does exactly that for a provider it lacks, so the fall-back below is ONNX Runtime's own;
only the list of available providers is made to claim the GPU ones, as onnxruntime-gpu's
does."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddpm_rt.backends import ort as ort_backend
from ddpm_rt.errors import BackendError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "models" / "default"
GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def onnxruntime_gpu_without_libraries(monkeypatch, tmp_path):
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: list(GPU))
    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path))


@pytest.mark.parametrize(
    "providers", [["CUDAExecutionProvider", "CPUExecutionProvider"], GPU, ["CUDAExecutionProvider"]]
)
def test_a_provider_that_fell_back_is_one_clear_error(
    onnxruntime_gpu_without_libraries, providers, capfd, recwarn
):
    from ddpm_rt import Generator

    with pytest.raises(BackendError) as e:
        Generator(DEFAULT, providers=providers).generate("red apple", num=1, steps=2)
    # nothing printed: ONNX Runtime's warnings (the C ABI prints nothing) nor its stdout
    assert capfd.readouterr() == ("", "")
    assert not [w for w in recwarn if "provider" in str(w.message)]
    msg = str(e.value)
    assert "\n" not in msg and "ONNX Runtime could not use" in msg
    assert "CUDAExecutionProvider" in msg and "would have run on CPUExecutionProvider" in msg


def test_the_cpu_provider_alone_is_used_as_asked(tmp_path, monkeypatch):
    from ddpm_rt import Generator

    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path))
    gen = Generator(DEFAULT)
    assert gen.backend.session(gen.unet_graph).get_providers() == ["CPUExecutionProvider"]
    assert gen.generate("red apple", num=1, steps=2).ndim == 4


def test_tensorrt_provider_options_per_graph(onnxruntime_gpu_without_libraries, tmp_path):
    """The TensorRT EP: its engine folder keyed by the graph's sha256 (the EP keys engines
    by file name and I/O names only), explicit profiles from the I/O spec, int8 enabled
    for the Q/DQ graph only, and never the text encoder."""
    from ddpm_rt import Bundle
    from ddpm_rt.backends import make_backend

    bundle = Bundle.load(DEFAULT, hash_all=False)
    backend = make_backend("ort", bundle, providers=GPU)
    opts = {}
    for graph in bundle.graphs:
        asked = backend.providers_for(graph)
        listed = ort_backend.provider_list(
            asked, backend.hashes[graph], backend.tensorrt_graphs.get(graph)
        )
        opts[graph] = dict(p for p in listed if isinstance(p, tuple)).get(
            "TensorrtExecutionProvider"
        )
    assert opts["text_encoder_int8"] is None and opts["unet_int8"] is None  # not TensorRT's
    fp32, qdq = opts["unet"], opts["unet_int8_qdq"]
    assert fp32["trt_engine_cache_path"] != qdq["trt_engine_cache_path"]
    sha = bundle.manifest["files"][bundle.graphs["unet"].file]["sha256"]
    assert Path(fp32["trt_engine_cache_path"]).name == sha
    assert Path(fp32["trt_engine_cache_path"]).is_relative_to(tmp_path)
    assert fp32["trt_timing_cache_path"] == fp32["trt_engine_cache_path"]
    assert fp32["trt_profile_min_shapes"].startswith("x:1x")
    assert fp32["trt_profile_max_shapes"].split(",")[1] == "t:32x1"  # 16 images, guided
    assert "trt_int8_enable" not in fp32 and qdq["trt_int8_enable"] is True
    assert backend.providers_for("text_encoder_int8") == GPU[1:]


def test_fell_back_names_what_was_dropped():
    asked = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_backend.fell_back(asked, asked) == []
    assert ort_backend.fell_back(asked, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "TensorrtExecutionProvider"
    ]
    # ONNX Runtime adds the CPU provider itself; that is no fall-back
    assert ort_backend.fell_back(["CUDAExecutionProvider"], GPU[1:]) == []
