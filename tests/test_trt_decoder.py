"""A latent bundle's decoder on the GPU paths, checked on a CPU through the doubles of
``tensorrt`` and ``cuda.bindings.runtime`` (tests/doubles/): its TensorRT engine (profile,
flags, cache), the ``trt`` backend running it, ONNX Runtime's TensorRT provider options for
it and ``build-engines --decoder-precision`` (doctor: test_doctor_decoder.py). As in
test_trt_contract.py, the
doubles' engines compute with ONNX Runtime: these tests catch misuse of the APIs, not
TensorRT's numerics (scripts/gpu_check.sh on a GPU does that)."""

from __future__ import annotations

import json
from pathlib import Path

import doubles
import numpy as np
import pytest
from decoder_variants import latent_variants
from doubles import tensorrt as trt_double

from ddpm_rt.backends.engine_cache import EngineCache
from ddpm_rt.errors import BackendError, BundleError, InputError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "models" / "default"
KW = {"seed": 5, "steps": 3, "sampler": "ddim", "eta": 0.0}
LATENT = [4, 8, 8]  # the latent_trained fixture's (C, h, w)


@pytest.fixture(scope="module")
def latent(latent_trained, tmp_path_factory) -> dict:
    """The latent fixture's bundle, and copies with fp16 + Q/DQ or QOperator int8 decoders."""
    return latent_variants(latent_trained["bundle"], tmp_path_factory.mktemp("decoders"))


def _build(bundle, cache, precisions=("fp32",), **kw):
    from ddpm_rt.backends.trt_build import build_engines

    lines: list[str] = []
    records = build_engines(bundle, precisions, cache, max_images=2, log=lines.append, **kw)
    return records, lines


def _plan_profile(cache: EngineCache, record) -> dict:
    """The profile TensorRT (the double) was given, read back from the built plan."""
    from ddpm_rt.backends.trt_build import current_platform

    data = cache.read_plan(current_platform(), record)
    head = data[len(trt_double.PLAN_MAGIC) :].partition(b"\n")[0]
    return json.loads(head)["profile"]


# -- the engine -------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_decoder_engine_profile_flags_and_cache(monkeypatch, tmp_path, latent, version):
    """One row per image in the decoder's profile (the U-Net's has guidance's two), a
    strongly typed network without precision flags, and the cached engine reused."""
    doubles.install(monkeypatch, tensorrt=version)
    networks, flags_set = [], []
    create = trt_double.Builder.create_network

    def spy_network(self, flags=0):
        networks.append(create(self, flags))
        return networks[-1]

    monkeypatch.setattr(trt_double.Builder, "create_network", spy_network)
    monkeypatch.setattr(trt_double.IBuilderConfig, "set_flag", lambda s, f: flags_set.append(f))
    cache = EngineCache(tmp_path)
    records, lines = _build(latent["plain"], cache)
    unet, decoder = records
    assert (unet.graph, decoder.graph) == ("unet", "decoder")
    assert decoder.flags.precision == "fp32" and decoder.key != unet.key
    assert decoder.flags.profile == {"latent": [[1, *LATENT], [2, *LATENT], [2, *LATENT]]}
    assert unet.flags.profile["x"][2][0] == 4  # guided: twice the images
    assert _plan_profile(cache, decoder) == decoder.flags.profile  # what TensorRT was given
    assert all(n.strongly_typed for n in networks) and flags_set == []
    assert any("building the fp32 decoder engine for decoder" in ln for ln in lines)
    again, lines = _build(latent["plain"], cache)
    assert again == records
    assert any(ln.startswith("reusing the cached fp32 decoder engine") for ln in lines)


def test_decoder_variants_fp16_qdq_and_qoperator(monkeypatch, tmp_path, latent):
    """fp16 from the decoder_fp16 graph; int8 from a Q/DQ graph only: a QOperator one is
    skipped with the reason under 'all', refused when asked for by name."""
    doubles.install(monkeypatch)
    cache = EngineCache(tmp_path)
    records, _ = _build(latent["qdq"], cache, decoders="all")
    assert [r.graph for r in records] == ["unet", "decoder", "decoder_fp16", "decoder_int8"]
    assert [r.flags.precision for r in records[1:]] == ["fp32", "fp16", "int8"]
    records, lines = _build(latent["qop"], cache, (), decoders="all")
    assert [r.graph for r in records] == ["decoder", "decoder_fp16"]
    assert any(
        ln.startswith("skipping the int8 decoder engine") and "QOperator" in ln for ln in lines
    )
    before = len(cache.entries())
    with pytest.raises(InputError, match=r"int8 decoder decoder_int8 is not for TensorRT"):
        _build(latent["qop"], cache, decoders=("fp32", "int8"))
    assert len(cache.entries()) == before  # refused before any work
    with pytest.raises(InputError, match=r"has no fp16 decoder for TensorRT \(it has fp32\)"):
        _build(latent["plain"], cache, decoders=("fp16",))


def test_build_engines_cli_decoder_precision(monkeypatch, tmp_path, capsys, latent):
    from ddpm_rt.cli import main

    doubles.install(monkeypatch)
    argv = ["build-engines", "--engine-cache", str(tmp_path / "engines"), "--max-batch", "2"]
    assert main([*argv, str(latent["qop"]), "--decoder-precision", "fp32,fp16"]) == 0
    assert "building the fp16 decoder engine" in capsys.readouterr().err
    assert main([*argv, str(latent["qop"]), "--decoder-precision", "int8"]) == 1
    assert "error: this bundle's int8 decoder" in capsys.readouterr().err
    assert main([*argv, str(latent["qop"]), "--decoder-precision", "bf16"]) == 1
    assert "--decoder-precision takes default, all, none or" in capsys.readouterr().err
    from craft import write_bundle

    pixels = write_bundle(tmp_path / "pixel-bundle")  # (the shipped model is a cascade)
    assert main([*argv, str(pixels), "--decoder-precision", "fp32"]) == 1
    assert "this bundle has no decoder" in capsys.readouterr().err
    assert main([*argv, str(pixels)]) == 0  # default: a pixel bundle has none to build
    assert "decoder engine" not in capsys.readouterr().err


# -- the trt backend --------------------------------------------------------------------------
def _generators(bundle, cache, **kw):
    from ddpm_rt import Generator

    return Generator(bundle, **kw), Generator(bundle, backend="trt", engine_cache=cache.root, **kw)


@pytest.mark.parametrize(
    ("which", "precision"), [("plain", "fp32"), ("qdq", "fp16"), ("qdq", "int8")]
)
def test_trt_backend_decodes_on_its_engine(monkeypatch, tmp_path, latent, which, precision):
    """3 images through a profile of 2: the decoder engine runs in slices of 2 and 1, and
    its images are the CPU's (the double computes with ONNX Runtime)."""
    from ddpm_rt.backends.trt import TrtBackend

    doubles.install(monkeypatch)
    cache = EngineCache(tmp_path)
    _build(latent[which], cache, decoders=(precision,))
    ran = []  # (graph, rows) of every engine launch
    run_engine = TrtBackend._run

    def spy(self, graph, e, feeds):
        ran.append((graph, len(next(iter(feeds.values())))))
        return run_engine(self, graph, e, feeds)

    monkeypatch.setattr(TrtBackend, "_run", spy)
    cpu, gpu = _generators(latent[which], cache, decoder_precision=precision)
    try:
        got = gpu.generate(["a red circle"], num=3, **KW)
        engine = gpu.backend.session(gpu.decoder_graph)
    finally:
        gpu.backend.close()
    want = cpu.generate(["a red circle"], num=3, **KW)
    assert engine["max_batch"] == 2 and engine["record"].graph == gpu.decoder_graph
    assert [n for g, n in ran if g == gpu.decoder_graph] == [2, 1]
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1, diff.max()


def test_a_decoder_engine_giving_another_shape_is_refused(monkeypatch, tmp_path, latent):
    doubles.install(monkeypatch)
    cache = EngineCache(tmp_path)
    _build(latent["plain"], cache)
    shape = trt_double.IExecutionContext.get_tensor_shape
    execute = trt_double.IExecutionContext.execute_async_v3

    def run_then_lie(self, stream_handle):  # the engine computes, then reports a wrong shape
        self.lie = False
        ok = execute(self, stream_handle)
        self.lie = True
        return ok

    def wrong(self, name):
        dims = shape(self, name)
        lie = name == "image" and getattr(self, "lie", False)
        return trt_double.Dims([*dims[:-1], dims[-1] // 2]) if lie else dims

    monkeypatch.setattr(trt_double.IExecutionContext, "execute_async_v3", run_then_lie)
    monkeypatch.setattr(trt_double.IExecutionContext, "get_tensor_shape", wrong)
    _, gpu = _generators(latent["plain"], cache)
    with pytest.raises(
        BackendError, match=r"gives image of shape \[1, 3, 32, 16\], the spec \[1, 3, 32, 32\]"
    ):
        gpu.generate("a dog", num=1, **KW)
    gpu.backend.close()


def test_a_missing_or_unusable_decoder_engine_says_what_to_do(monkeypatch, tmp_path, latent):
    from ddpm_rt import Generator

    doubles.install(monkeypatch)
    cache = EngineCache(tmp_path)
    _build(latent["qop"], cache, decoders=())
    with pytest.raises(BackendError, match=r"fp32 decoder in .*--decoder-precision fp32'"):
        Generator(latent["qop"], backend="trt", engine_cache=cache.root)
    with pytest.raises(InputError, match=r"int8 decoder decoder_int8 is not for TensorRT"):
        Generator(latent["qop"], backend="trt", engine_cache=cache.root, decoder_precision="int8")


# -- ONNX Runtime's TensorRT provider ---------------------------------------------------------
def test_ort_tensorrt_provider_options_for_the_decoder(monkeypatch, tmp_path, latent):
    """The decoder's profile is one row per image up to the Generator's default batch; a
    Q/DQ int8 decoder gets trt_int8_enable, a QOperator one stays off the TensorRT EP."""
    from ddpm_rt import Bundle
    from ddpm_rt.backends import make_backend
    from ddpm_rt.backends import ort as ort_backend

    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: list(gpu))
    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path))

    def trt_options(bundle, graph):
        backend = make_backend("ort", bundle, providers=gpu)
        asked = backend.providers_for(graph)
        listed = ort_backend.provider_list(
            asked, backend.hashes[graph], backend.tensorrt_graphs.get(graph)
        )
        return dict(p for p in listed if isinstance(p, tuple)).get("TensorrtExecutionProvider")

    qdq = Bundle.load(latent["qdq"], hash_all=False)
    fp32 = trt_options(qdq, "decoder")
    assert fp32["trt_profile_min_shapes"] == "latent:1x4x8x8"
    assert fp32["trt_profile_max_shapes"] == "latent:16x4x8x8"  # 16 images, no guidance rows
    sha = qdq.manifest["files"]["decoder.onnx"]["sha256"]
    assert Path(fp32["trt_engine_cache_path"]).name == sha and "trt_int8_enable" not in fp32
    assert "trt_int8_enable" not in trt_options(qdq, "decoder_fp16")
    assert trt_options(qdq, "decoder_int8")["trt_int8_enable"] is True
    assert trt_options(Bundle.load(latent["qop"], hash_all=False), "decoder_int8") is None


# -- reading op types without onnx ------------------------------------------------------------
def test_graph_ops_tells_qdq_from_qoperator_and_refuses_damage(latent):
    from ddpm_rt.bundle.graph_ops import not_qdq, op_types

    qdq, qop = latent["qdq"], latent["qop"]
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= op_types(
        (qdq / "decoder.int8.onnx").read_bytes()
    )
    assert not_qdq((qdq / "decoder.int8.onnx").read_bytes()) is None
    assert "ConvInteger" in not_qdq((qop / "decoder.int8.onnx").read_bytes())
    assert "no QuantizeLinear" in not_qdq((qdq / "decoder.fp16.onnx").read_bytes())
    data = (qdq / "decoder.onnx").read_bytes()
    with pytest.raises(BundleError, match="damaged ONNX graph"):
        op_types(data[: len(data) // 2])
