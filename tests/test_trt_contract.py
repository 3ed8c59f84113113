"""Contract tests of the TensorRT path on a CPU: the engine builder, the engine cache, the
``trt`` backend and the GPU probe, driven through strict doubles of ``tensorrt`` and
``cuda.bindings.runtime`` (tests/doubles/) whose engines compute with ONNX Runtime, so the
backend's images can be compared with the CPU's. They catch misuse of those APIs; they are
no substitute for the real run (tests marked gpu/trt, scripts/gpu_check.sh)."""

from __future__ import annotations

import inspect
import logging
import re
import threading
from pathlib import Path

import doubles
import numpy as np
import pytest
from doubles import cuda_runtime
from doubles import tensorrt as trt_double

from ddpm_rt.backends.engine_cache import EngineCache
from ddpm_rt.errors import BackendError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "models" / "default"
KW = {"seed": 5, "steps": 4, "sampler": "ddim", "eta": 0.0}
A100 = ("NVIDIA A100-SXM4-80GB", 8, 0, 80 << 30)
H200 = ("NVIDIA H200", 9, 0, 141 << 30)


def _build(cache, precisions=("fp32",), **kw):
    from ddpm_rt.backends.trt_build import build_engines

    lines: list[str] = []
    records = build_engines(DEFAULT, precisions, cache, log=lines.append, **kw)
    return records, lines


def _cpu_images(precision="fp32", prompts=("red apple",), **kw):
    from ddpm_rt import Generator

    cpu_precision = "int8-qdq" if precision == "int8" else precision
    return Generator(DEFAULT, unet_precision=cpu_precision).generate(list(prompts), **kw)


def _trt_images(cache, precision="fp32", prompts=("red apple",), **kw):
    from ddpm_rt import Generator

    gen = Generator(DEFAULT, backend="trt", unet_precision=precision, engine_cache=cache.root)
    try:
        return gen.generate(list(prompts), **kw)
    finally:
        gen.backend.close()


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """Images from the same eps (ONNX Runtime in both), up to a batch's float rounding."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


# -- the doubles follow the real bindings -----------------------------------------------------
def test_cuda_double_matches_the_real_bindings():
    """Every function of the CUDA double has the real binding's name and parameters (from
    the docstring's first line, e.g. 'cudaMemcpyAsync(dst, src, size_t count, kind:
    cudaMemcpyKind, stream)'), and every enum member its name and value."""
    real = pytest.importorskip("cuda.bindings.runtime")
    functions = [
        n
        for n, f in vars(cuda_runtime).items()
        if n.startswith("cuda") and inspect.isfunction(f) and n[4].isupper()
    ]
    assert len(functions) >= 18
    for name in functions:
        first = getattr(real, name).__doc__.strip().splitlines()[0]
        params = re.fullmatch(rf"{name}\((.*)\)", first).group(1)
        want = [p.split(":")[0].split()[-1] for p in params.split(",") if p.strip()]
        got = list(inspect.signature(getattr(cuda_runtime, name)).parameters)
        assert got == want, name
    for enum_name in ("cudaError_t", "cudaMemcpyKind", "cudaStreamCaptureMode"):
        for member in getattr(cuda_runtime, enum_name):
            assert int(getattr(getattr(real, enum_name), member.name)) == int(member), member
    for handle in ("cudaStream_t", "cudaGraph_t", "cudaGraphExec_t", "cudaDeviceProp"):
        assert hasattr(real, handle)
    utils = pytest.importorskip("cuda.bindings.utils")
    assert utils.get_cuda_native_handle(real.cudaStream_t(0)) == 0


def test_cuda_double_refuses_what_the_runtime_refuses(monkeypatch):
    state = doubles.install(monkeypatch)
    rt = cuda_runtime
    err, ptr = rt.cudaMalloc(64)
    assert err == rt.OK and ptr in state.device_mem
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    host = np.zeros(16, np.float32)
    assert rt.cudaMemcpyAsync(ptr + 8, host.ctypes.data, 64, kind, 0)[0] != rt.OK  # past end
    assert rt.cudaMemcpyAsync(12345, host.ctypes.data, 4, kind, 0)[0] != rt.OK  # never allocated
    with pytest.raises(TypeError):
        rt.cudaMemcpyAsync(ptr, host.ctypes.data, 4, 1, 0)  # kind must be the enum
    with pytest.raises(TypeError):
        rt.cudaMemcpyAsync(ptr, host.ctypes.data, 4, kind)  # stream is not optional
    assert rt.cudaFree(ptr) == (rt.OK,) and rt.cudaFree(ptr)[0] != rt.OK  # double free
    err, stream = rt.cudaStreamCreate()
    with pytest.raises(DeprecationWarning):
        int(stream)  # cuda-bindings 13: deprecated, subject to removal
    assert rt.get_cuda_native_handle(stream) in state.streams
    # a capture's end fails if the capture was invalidated (no warm-up run, say)
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    assert rt.cudaStreamBeginCapture(stream, mode) == (rt.OK,)
    rt.invalidate_capture(stream)
    assert rt.cudaStreamEndCapture(stream)[0] == rt.cudaError_t.cudaErrorStreamCaptureInvalidated
    assert rt.cudaStreamDestroy(stream) == (rt.OK,)
    assert rt.cudaStreamSynchronize(stream)[0] != rt.OK  # destroyed


def test_tensorrt_double_refuses_what_tensorrt_refuses(monkeypatch):
    doubles.install(monkeypatch, tensorrt="11.0.0")
    import tensorrt as trt

    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "INT8")
    assert not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    logger = trt.Logger(trt.Logger.WARNING)
    config = trt.Builder(logger).create_builder_config()
    assert config.create_timing_cache(b"garbage") is None
    assert config.set_timing_cache(None, ignore_mismatch=False) is False
    assert config.get_timing_cache() is None
    with pytest.raises(TypeError):
        config.set_memory_pool_limit(0, 1 << 20)  # the pool is a MemoryPoolType
    profile = trt.Builder(logger).create_optimization_profile()
    with pytest.raises(RuntimeError, match="inconsistent"):
        profile.set_shape("x", (4, 3), (2, 3), (8, 3))
    assert trt.Runtime(logger).deserialize_cuda_engine(b"not a plan") is None
    with pytest.raises(TypeError, match="Could not resolve"):
        trt.nptype(trt.DataType.BF16)


# -- build-engines ----------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_build_engines_every_precision(monkeypatch, tmp_path, version):
    doubles.install(monkeypatch, tensorrt=version)
    cache = EngineCache(tmp_path)
    records, lines = _build(cache, ("fp32", "fp16", "int8"), max_images=2)
    unets = [r for r in records if r.graph.startswith("unet")]
    assert [r.flags.precision for r in unets] == ["fp32", "fp16", "int8"]
    assert [r.graph for r in unets] == ["unet", "unet_fp16", "unet_int8_qdq"]
    # the shipped cascade's decoder: its default precision's engine beside them
    assert [r.graph for r in records if not r.graph.startswith("unet")] == ["decoder"]
    assert all(r.tensorrt_version == version for r in records)
    assert all(r.flags.profile["x"][2][0] == 4 for r in unets)  # 2 images with guidance
    assert cache.timing_cache_path(_here()).is_file()
    again, lines = _build(cache, ("fp32", "fp16", "int8"), max_images=2)
    assert again == records and all(ln.startswith("reusing the cached") for ln in lines)


def _here():
    from ddpm_rt.backends.trt_build import current_platform

    return current_platform()


def test_build_engines_on_two_gpus_sharing_one_cache(monkeypatch, tmp_path):
    """A timing cache made on one GPU is refused by another (set_timing_cache -> False):
    the build must not then crash on get_timing_cache() -> None (the plan was lost)."""
    state = doubles.install(monkeypatch, devices=(H200, A100))
    cache = EngineCache(tmp_path)
    _build(cache)
    doubles.use_device(state, 1)
    records, _lines = _build(cache)
    assert records[0].gpu_name == A100[0]
    assert len(cache.entries()) == 2 * len(records)  # U-Net + the cascade's decoder, per GPU


def test_build_engines_with_a_timing_cache_from_another_gpu(monkeypatch, tmp_path):
    state = doubles.install(monkeypatch, devices=(H200, A100))
    cache = EngineCache(tmp_path)
    _build(cache)
    h200_timing = cache.timing_cache_path(_here()).read_bytes()
    doubles.use_device(state, 1)
    a100 = cache.timing_cache_path(_here())
    a100.parent.mkdir(parents=True)
    a100.write_bytes(h200_timing)  # copied over from the other machine
    _records, lines = _build(cache)
    assert any("damaged or from another GPU: starting a fresh one" in ln for ln in lines)
    assert A100[0] in a100.read_bytes().decode(errors="replace")  # replaced by this GPU's


def test_build_engines_with_a_damaged_timing_cache(monkeypatch, tmp_path):
    doubles.install(monkeypatch)
    cache = EngineCache(tmp_path)
    path = cache.timing_cache_path(_here())
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00half-written")
    records, lines = _build(cache)
    assert any("damaged or from another GPU" in ln for ln in lines)
    assert path.read_bytes().startswith(trt_double.CACHE_MAGIC)
    assert cache.read_plan(_here(), records[0])


def test_build_engines_cli_in_process(monkeypatch, tmp_path, capsys):
    from ddpm_rt.cli import main

    doubles.install(monkeypatch)
    argv = ["build-engines", str(DEFAULT), "--engine-cache", str(tmp_path), "--max-batch", "2"]
    assert main([*argv, "--unet-precision", "fp32,int8"]) == 0
    err = capsys.readouterr().err
    assert "building the fp32 engine" in err and "building the int8 engine" in err
    assert main([*argv, "--unet-precision", "fp16,bf16"]) == 1
    assert "--unet-precision takes fp32, fp16, int8" in capsys.readouterr().err
    assert main(["build-engines", "--clear", "--engine-cache", str(tmp_path)]) == 0
    assert "removed 3 engine(s)" in capsys.readouterr().err  # 2 U-Nets + the decoder


def test_the_text_encoder_is_refused_by_the_parser(monkeypatch):
    from ddpm_rt import Bundle
    from ddpm_rt.backends.engine_cache import BuildFlags
    from ddpm_rt.backends.trt_build import build_plan

    doubles.install(monkeypatch)
    b = Bundle.load(DEFAULT, hash_all=False)
    flags = BuildFlags("fp32", {"input_ids": [[1, 1], [1, 8], [2, 16]]})
    with pytest.raises(BackendError, match=r"ONNX parser refused .* DynamicQuantizeLinear"):
        build_plan(b.graph_bytes("text_encoder_int8"), flags, None, print)


# -- the trt backend --------------------------------------------------------------------------
@pytest.fixture
def built(monkeypatch, tmp_path):
    """Engines for every precision, profile up to 2 images (4 rows with guidance)."""
    state = doubles.install(monkeypatch)
    cache = EngineCache(tmp_path / "engines")
    _build(cache, ("fp32", "fp16", "int8"), max_images=2)
    monkeypatch.delenv("DDPM_RT_CUDA_GRAPHS", raising=False)
    return state, cache


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_trt_backend_batch_one_matches_the_cpu(built, precision):
    _, cache = built
    _same(_trt_images(cache, precision, num=1, **KW), _cpu_images(precision, num=1, **KW))


def test_trt_backend_slices_a_batch_above_the_profile(built):
    """3 images with guidance are 6 rows; the profile takes 4: slices of 4 and 2."""
    _, cache = built
    _same(_trt_images(cache, num=3, **KW), _cpu_images(num=3, **KW))


@pytest.mark.parametrize("cuda", ["13.4", "12.6"])
def test_cuda_graphs_on_and_off_give_the_same_images(built, monkeypatch, cuda):
    state, cache = built
    state.version = tuple(int(v) for v in cuda.split("."))
    if state.version < (12, 9):
        monkeypatch.setitem(__import__("sys").modules, "cuda.bindings.utils", None)
    off = _trt_images(cache, num=3, **KW)
    monkeypatch.setenv("DDPM_RT_CUDA_GRAPHS", "1")
    state.calls.clear()
    on = _trt_images(cache, num=3, **KW)
    assert state.calls.count("cudaGraphLaunch") >= 2 * (KW["steps"] - 1)  # both shapes replayed
    assert np.array_equal(on, off)
    _same(on, _cpu_images(num=3, **KW))


def test_a_failed_capture_turns_graphs_off_for_that_shape(built, monkeypatch, caplog):
    state, cache = built
    monkeypatch.setenv("DDPM_RT_CUDA_GRAPHS", "1")
    state.fail_capture = True
    with caplog.at_level(logging.WARNING, logger="ddpm_rt.backends.trt"):
        images = _trt_images(cache, num=1, **KW)
    assert "cudaGraphLaunch" not in state.calls
    assert "CUDA graph capture failed for unet" in caplog.text
    # once per graph and shape (the U-Net's, the cascade's decoder's), not every step
    assert len(caplog.records) == 2
    _same(images, _cpu_images(num=1, **KW))


def test_two_threads_share_one_generator(built):
    from ddpm_rt import Generator

    _, cache = built
    gen = Generator(DEFAULT, backend="trt", engine_cache=cache.root)
    prompts = ["red apple", "a dog"]
    out: dict[int, np.ndarray] = {}

    def work(i):
        out[i] = gen.generate(prompts[i], num=2, **KW)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    gen.backend.close()
    for i, p in enumerate(prompts):
        _same(out[i], _cpu_images(prompts=(p,), num=2, **KW))


def test_the_text_encoder_stays_on_onnx_runtime(built):
    from ddpm_rt import Generator

    _, cache = built
    gen = Generator(DEFAULT, backend="trt", engine_cache=cache.root)
    assert gen.backend.providers == ["CPUExecutionProvider"] and gen.backend.threads is None
    text = next(g for g in gen.bundle.graphs if g.startswith("text_encoder"))
    assert gen.backend.session(text).get_providers() == ["CPUExecutionProvider"]
    assert gen.backend.session(gen.unet_graph)["max_batch"] == 4
    gen.backend.close()


# -- engine-cache selection and refusals ------------------------------------------------------
def test_an_engine_from_another_tensorrt_or_gpu_is_refused(built, monkeypatch):
    from ddpm_rt import Generator

    state, cache = built
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt_double.make("10.4.0"))
    with pytest.raises(BackendError, match=r"built with TensorRT 10\.3\.0, this is TensorRT 10\.4"):
        Generator(DEFAULT, backend="trt", engine_cache=cache.root)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt_double.make("10.3.0"))
    state.devices[0] = ("Orin", 8, 7, 32 << 30)
    with pytest.raises(BackendError, match=r"built for NVIDIA H200 .* this GPU is Orin"):
        Generator(DEFAULT, backend="trt", engine_cache=cache.root)


def test_a_changed_plan_or_missing_engine_is_refused(built):
    from ddpm_rt import Generator

    _, cache = built
    here = _here()
    rec = next(r for _, r in cache.entries() if r.flags.precision == "fp16")
    plan, _ = cache.paths(here, rec.key)
    plan.write_bytes(b"X" * plan.stat().st_size)
    with pytest.raises(BackendError, match="does not match its record"):
        Generator(DEFAULT, backend="trt", unet_precision="fp16", engine_cache=cache.root)
    with pytest.raises(BackendError, match=r"no TensorRT engine .* --unet-precision fp32"):
        Generator(DEFAULT, backend="trt", engine_cache=cache.root.parent / "empty")


def test_an_engine_tensorrt_cannot_load_says_rebuild(built, monkeypatch):
    """A plan whose record matches but which TensorRT refuses (deserialize -> None)."""
    from ddpm_rt import Generator

    _state, cache = built
    monkeypatch.setattr(trt_double.Runtime, "deserialize_cuda_engine", lambda self, data: None)
    with pytest.raises(BackendError, match=r"could not load the fp32 engine .* --force"):
        Generator(DEFAULT, backend="trt", engine_cache=cache.root)


# -- the GPU probe ----------------------------------------------------------------------------
def test_probe_lists_gpus_through_the_doubles(monkeypatch):
    from ddpm_rt.backends.gpu import backend_status, probe

    doubles.install(monkeypatch, devices=(H200, A100))
    r = probe()
    assert r.tensorrt_version == "10.3.0" and r.driver_version == "13.0"
    assert [d["name"] for d in r.devices] == [H200[0], A100[0]]
    assert r.devices[1]["compute_capability"] == (8, 0) and r.devices[1]["memory_gib"] == 80.0
    rows = {row["backend"]: row for row in backend_status(r)}
    assert rows["trt (TensorRT 10.3.0)"]["usable"]
    assert not rows["ort (CUDAExecutionProvider)"]["usable"]  # this onnxruntime is CPU-only


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"driver": 12020}, "older than this CUDA runtime (13.0); update the driver"),
        ({"devices": ()}, "no CUDA GPU found"),
        ({"driver": 0}, "no NVIDIA driver is installed"),
        ({"tensorrt": None}, None),
    ],
)
def test_probe_says_why_not(monkeypatch, settings, why):
    from ddpm_rt.backends.gpu import backend_status, probe

    doubles.install(monkeypatch, **settings)
    r = probe()
    if why is None:
        assert "TensorRT is not installed" in r.tensorrt_why and r.gpu
        trt_row = next(row for row in backend_status(r) if row["backend"].startswith("trt"))
        assert not trt_row["usable"] and "ddpm-rt[trt]" in trt_row["why"]
    else:
        assert not r.gpu and why in r.gpu_why


class _BrokenLoader:
    """A meta-path finder whose module fails to load as a broken install's does."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise OSError(f"lib for {fullname}: cannot open shared object file")
        return None


@pytest.mark.parametrize("name", ["tensorrt", "cuda.bindings.runtime"])
def test_a_broken_install_is_one_line(monkeypatch, name):
    import sys

    from ddpm_rt.backends import gpu

    doubles.install(monkeypatch)
    monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenLoader(name), *sys.meta_path])
    get = gpu.tensorrt if name == "tensorrt" else gpu.cudart
    with pytest.raises(BackendError, match=r"is installed but does not load: lib for"):
        get()


def test_cuda_python_under_its_old_name_and_absent(monkeypatch):
    import sys

    from ddpm_rt.backends import gpu

    doubles.install(monkeypatch, cuda="12.6")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", cuda_runtime)  # cuda-python < 12.6
    assert gpu.cudart() is cuda_runtime
    assert gpu.probe().devices[0]["name"] == H200[0]
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    with pytest.raises(BackendError, match="cuda-python is not installed"):
        gpu.cudart()
    r = gpu.probe()
    assert "cuda-python is not installed" in r.cuda_python_why and not r.gpu
    assert r.gpu_why  # no driver here, or one that cannot be asked without cuda-python


def test_a_failing_cuda_call_and_a_gpu_provider_without_a_gpu(monkeypatch):
    from ddpm_rt.backends import gpu
    from ddpm_rt.backends import ort as ort_backend

    doubles.install(monkeypatch)
    monkeypatch.setattr(
        cuda_runtime,
        "cudaGetDeviceProperties",
        lambda device: (cuda_runtime.cudaError_t.cudaErrorInvalidDevice, None),
    )
    r = gpu.probe()
    assert r.gpu_why == "CUDA error in device properties: cudaErrorInvalidDevice"
    monkeypatch.setattr(
        ort_backend.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    r = gpu.probe()
    rows = {row["backend"]: row for row in gpu.backend_status(r)}
    assert rows["ort (CUDAExecutionProvider)"]["why"] == r.gpu_why


@pytest.mark.slow
def test_gpu_check_script_through_the_doubles(tmp_path):
    """scripts/gpu_check.sh, run as a user runs it, with every process it starts on the
    doubles (tests/doubles/site/sitecustomize.py): each TensorRT check passes, ONNX
    Runtime's GPU providers are skipped (this onnxruntime has none), the verdict is PASS
    and the report holds versions, GPU and every check."""
    import os
    import subprocess
    import sys

    report = tmp_path / "report.txt"
    env = {
        **os.environ,
        "DDPM_RT_DOUBLES": "10.3.0",
        "PYTHONPATH": str(ROOT / "tests" / "doubles" / "site"),
        "PYTHON": sys.executable,
        "REPORT": str(report),
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for check in (
        "build every engine",
        "rebuild every engine from the timing cache",
        "survive a damaged timing cache",
        "ddpm-rt doctor",
        "gpu/trt tests",
        "CUDA graphs on and off give the same images",
        "two threads on one Generator",
    ):
        assert any(ln.startswith("PASS") and check in ln for ln in lines), (check, proc.stdout)
    assert sum(ln.startswith("SKIP ort ") for ln in lines) == 6
    assert "VERDICT: PASS" in proc.stdout
    text = report.read_text()
    assert "tensorrt: 10.3.0" in text and "NVIDIA H200" in text and "VERDICT: PASS" in text
    assert not any(p.name.startswith("ddpm-rt-gpu-check") for p in tmp_path.iterdir())


def test_trt_backend_on_tensorrt_11(monkeypatch, tmp_path):
    """TensorRT 11: no STRONGLY_TYPED flag passed (always on), the same engines and images."""
    doubles.install(monkeypatch, tensorrt="11.0.0")
    cache = EngineCache(tmp_path)
    _build(cache, ("fp32", "int8"), max_images=2)
    for precision in ("fp32", "int8"):
        _same(_trt_images(cache, precision, num=3, **KW), _cpu_images(precision, num=3, **KW))
