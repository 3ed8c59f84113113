"""The GPU/TensorRT path: everything that needs no GPU, tested here; the rest (marked gpu/trt)
runs where TensorRT and a CUDA GPU are present and skips elsewhere, saying why."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ddpm_rt.backends.engine_cache import (
    BuildFlags,
    EngineCache,
    EngineRecord,
    Platform,
    engine_key,
    gpu_slug,
    mismatch,
)
from ddpm_rt.bundle.io_spec import profile_shapes, text_encoder_io, unet_batch_range, unet_io
from ddpm_rt.errors import BackendError, InputError

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "models" / "default"
SHA = hashlib.sha256(b"graph").hexdigest()
HERE = Platform("10.13.3.9", "NVIDIA H200", (9, 0))


def _flags(precision="fp32", max_images=16) -> BuildFlags:
    return BuildFlags(
        precision, profile_shapes(unet_io(3, 16, 16, 384), unet_batch_range(max_images))
    )


def _record(flags=None, here=HERE, sha=SHA) -> EngineRecord:
    return EngineRecord(
        graph="unet",
        onnx_sha256=sha,
        flags=flags or _flags(),
        tensorrt_version=here.tensorrt_version,
        gpu_name=here.gpu_name,
        compute_capability=here.compute_capability,
    )


# -- optimisation profiles from the one I/O spec ----------------------------------------------
def test_unet_profile_doubles_the_batch_for_guidance():
    prof = profile_shapes(unet_io(3, 16, 16, 384), unet_batch_range(16))
    assert prof == {
        "x": [[1, 3, 16, 16], [16, 3, 16, 16], [32, 3, 16, 16]],
        "t": [[1, 1], [16, 1], [32, 1]],
        "c": [[1, 384], [16, 384], [32, 384]],
    }
    assert unet_batch_range(4, guidance=False) == (1, 4, 4)


def test_text_encoder_profile_covers_batch_and_sequence():
    prof = profile_shapes(text_encoder_io(384), (1, 1, 8), sequence=(1, 16, 256))
    assert prof["input_ids"] == [[1, 1], [1, 16], [8, 256]]
    assert prof["attention_mask"] == prof["input_ids"]
    with pytest.raises(ValueError, match="no range for its dynamic axis 'sequence'"):
        profile_shapes(text_encoder_io(384), (1, 1, 8))


@pytest.mark.parametrize("bad", [(0, 1, 2), (4, 2, 8), (1, 2), (1.0, 2, 3)])
def test_profile_ranges_are_checked(bad):
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        profile_shapes(unet_io(3, 16, 16, 8), bad)


# -- cache keys, paths, records ---------------------------------------------------------------
def test_engine_key_depends_on_graph_and_every_flag():
    base = engine_key(SHA, _flags())
    assert base == engine_key(SHA, _flags())  # deterministic
    assert engine_key(hashlib.sha256(b"other").hexdigest(), _flags()) != base
    assert engine_key(SHA, _flags("fp16")) != base
    assert engine_key(SHA, _flags(max_images=8)) != base
    f = _flags()
    assert engine_key(SHA, BuildFlags(f.precision, f.profile, optimization_level=5)) != base
    assert engine_key(SHA, BuildFlags(f.precision, f.profile, workspace_mib=64)) != base
    with pytest.raises(InputError, match="not a sha256"):
        engine_key("../../etc", _flags())


def test_cache_layout_record_roundtrip_and_lookup(tmp_path):
    cache = EngineCache(tmp_path)
    rec = cache.store(HERE, _record(), b"PLAN" * 100)
    plan, meta = cache.paths(HERE, rec.key)
    assert plan == tmp_path / "10.13.3.9" / "nvidia-h200-sm90" / f"{rec.key}.plan"
    assert meta.with_suffix(".plan") == plan and plan.read_bytes() == b"PLAN" * 100
    saved = json.loads(meta.read_text())
    assert saved["format"] == "ddpm-rt-engine" and saved["onnx_sha256"] == SHA
    assert saved["plan_sha256"] == hashlib.sha256(b"PLAN" * 100).hexdigest()
    assert saved["flags"]["profile"]["x"][2] == [32, 3, 16, 16]
    assert cache.lookup(HERE, SHA, _flags()) == rec
    assert cache.read_plan(HERE, rec) == b"PLAN" * 100
    assert cache.lookup(HERE, SHA, _flags("fp16")) is None  # other flags: another engine
    # one timing cache per GPU: TensorRT refuses another device's
    assert cache.timing_cache_path(HERE) == plan.parent / "timing.cache"
    assert gpu_slug("NVIDIA GeForce RTX 4090", (8, 9)) == "nvidia-geforce-rtx-4090-sm89"


def test_a_changed_plan_is_not_used(tmp_path):
    cache = EngineCache(tmp_path)
    rec = cache.store(HERE, _record(), b"A" * 64)
    plan, meta = cache.paths(HERE, rec.key)
    plan.write_bytes(b"B" * 64)  # same size, other bytes
    with pytest.raises(BackendError, match="does not match its record"):
        cache.read_plan(HERE, rec)
    plan.write_bytes(b"B" * 65)  # other size: not a cache hit at all
    assert cache.lookup(HERE, SHA, _flags()) is None
    meta.write_text("{not json")
    with pytest.raises(BackendError, match="damaged engine record"):
        cache.lookup(HERE, SHA, _flags())


def test_mismatch_says_what_to_rebuild():
    rec = _record()
    assert mismatch(rec, HERE, SHA) is None
    why = mismatch(rec, Platform("10.3.0", "NVIDIA H200", (9, 0)), SHA)
    assert "TensorRT 10.13.3.9" in why and "this is TensorRT 10.3.0" in why
    assert "ddpm-rt build-engines" in why
    why = mismatch(rec, Platform("10.13.3.9", "Orin", (8, 7)), SHA)
    assert "built for NVIDIA H200 (compute capability 9.0)" in why and "Orin (8.7)" in why
    other = hashlib.sha256(b"new model").hexdigest()
    assert "built from another ONNX graph" in mismatch(rec, HERE, other)


def test_select_picks_the_largest_profile_and_explains_absence(tmp_path):
    cache = EngineCache(tmp_path)
    with pytest.raises(
        BackendError, match=r"no TensorRT engine .* build-engines BUNDLE --unet-precision fp32"
    ):
        cache.select(HERE, SHA, "fp32")
    cache.store(HERE, _record(_flags(max_images=4)), b"small")
    big = cache.store(HERE, _record(_flags(max_images=32)), b"big")
    assert cache.select(HERE, SHA, "fp32") == big
    with pytest.raises(BackendError, match="no TensorRT engine"):
        cache.select(HERE, SHA, "fp16")
    jetson = Platform("10.3.0", "Orin", (8, 7))
    with pytest.raises(
        BackendError, match=r"built with TensorRT 10\.13\.3\.9, this is TensorRT 10\.3\.0"
    ):
        cache.select(jetson, SHA, "fp32")


def test_clear_removes_what_the_cache_wrote(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    assert cache.clear() == 0  # no folder yet
    rec = cache.store(HERE, _record(), b"x")
    cache.store(Platform("10.3.0", "Orin", (8, 7)), _record(), b"y")
    cache.timing_cache_path(HERE).write_bytes(b"timing")
    (tmp_path / "engines" / "10.3.0" / "timing.cache").write_bytes(b"old layout")
    with cache.lock(HERE, rec.key):
        pass  # leaves its .lock file
    assert cache.clear() == 2
    assert list((tmp_path / "engines").iterdir()) == []


@pytest.mark.parametrize(
    "foreign", ["notes.txt", "10.3.0/readme.md", "10.3.0/orin-sm87/photo.jpg", "src/main.c"]
)
def test_clear_refuses_a_folder_that_is_not_an_engine_cache(tmp_path, foreign):
    """--engine-cache pointed at the wrong folder must not empty it (it once deleted every
    file in the folder given)."""
    cache = EngineCache(tmp_path)
    cache.store(HERE, _record(), b"x")
    (tmp_path / foreign).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / foreign).write_text("keep me")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(InputError, match=r"is not a ddpm-rt engine cache .* nothing was removed"):
        cache.clear()
    assert sorted(p for p in tmp_path.rglob("*")) == before


def _build_once(root: str, log: str) -> None:
    cache = EngineCache(root)
    key = engine_key(SHA, _flags())
    with cache.lock(HERE, key):
        if cache.lookup(HERE, SHA, _flags()) is None:
            time.sleep(0.3)  # a slow build: the others must wait, then reuse it
            with open(log, "a") as f:
                f.write("built\n")
            cache.store(HERE, _record(), b"engine-bytes" * 1000)


def test_concurrent_builders_build_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "builds.log"
    procs = [
        ctx.Process(target=_build_once, args=(str(tmp_path / "c"), str(log))) for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert log.read_text() == "built\n"
    cache = EngineCache(tmp_path / "c")
    rec = cache.lookup(HERE, SHA, _flags())
    assert cache.read_plan(HERE, rec) == b"engine-bytes" * 1000


# -- what the CLI and the API say on a machine without TensorRT -------------------------------
def _no_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.skipif(not _no_tensorrt(), reason="TensorRT is installed here")
def test_build_engines_without_tensorrt_is_one_clear_line(tmp_path):
    proc = run_cli("build-engines", str(DEFAULT), "--engine-cache", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "TensorRT is not installed" in proc.stderr and "ddpm-rt[trt]" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_build_engines_refuses_bad_input_before_any_work(tmp_path):
    proc = run_cli("build-engines", str(DEFAULT), "--unet-precision", "fp64", check=False)
    assert proc.returncode == 1 and "--unet-precision takes fp32, fp16, int8" in proc.stderr
    b = tmp_path / "b"
    shutil.copytree(DEFAULT, b)
    m = json.loads((b / "manifest.json").read_text())
    m["unet_precisions"].pop("int8-qdq", None)
    (b / "manifest.json").write_text(json.dumps(m))
    proc = run_cli("build-engines", str(b), "--unet-precision", "int8", check=False)
    assert proc.returncode == 1
    assert "no int8-qdq U-Net for TensorRT" in proc.stderr
    assert "ddpm-rt quantize BUNDLE --precision int8-qdq" in proc.stderr
    proc = run_cli("build-engines", str(DEFAULT), "--optimization-level", "9", check=False)
    assert proc.returncode == 1 and "--optimization-level must be in 0..5" in proc.stderr
    proc = run_cli("build-engines", check=False)
    assert proc.returncode == 1 and "give a bundle folder" in proc.stderr


def test_build_engines_clear(tmp_path):
    EngineCache(tmp_path).store(HERE, _record(), b"x")
    proc = run_cli("build-engines", "--clear", "--engine-cache", str(tmp_path))
    assert "removed 1 engine(s)" in proc.stderr and not any(tmp_path.iterdir())
    (tmp_path / "thesis.tex").write_text("years of work")
    proc = run_cli("build-engines", "--clear", "--engine-cache", str(tmp_path), check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ") and "is not a ddpm-rt engine cache" in proc.stderr
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


@pytest.mark.skipif(not _no_tensorrt(), reason="TensorRT is installed here")
def test_trt_backend_without_tensorrt(tmp_path):
    from ddpm_rt import Generator

    with pytest.raises(BackendError, match="TensorRT is not installed"):
        Generator(DEFAULT, backend="trt")
    out = tmp_path / "a.png"
    proc = run_cli("--prompt", "red apple", "--backend", "trt", "--out", str(out), check=False)
    assert proc.returncode == 1 and "TensorRT is not installed" in proc.stderr
    assert not out.exists()


def test_unet_precision_flag_takes_effect(tmp_path):
    """--unet-precision reaches the Generator (it was once parsed and then ignored)."""
    a, b = tmp_path / "fp32.png", tmp_path / "int8.png"
    run_cli("--prompt", "red apple", "--out", str(a), "--no-progress")
    run_cli("--prompt", "red apple", "--out", str(b), "--no-progress", "--unet-precision", "int8")
    info = run_cli("info", str(b)).stdout
    assert '"unet_precision": "int8"' in info
    assert a.read_bytes() != b.read_bytes()


def test_doctor_image_check_passes_int8_and_fails_another_picture():
    """int8 images are judged against the gap between two concepts: the shipped int8 and
    Q/DQ variants pass; another picture of the same prompts (the next seed, standing in for
    a subtly broken graph) and a black image fail; fp32's tight limit refuses int8."""
    from ddpm_rt import Generator
    from ddpm_rt.tools.doctor import PROMPTS, image_check

    def images(precision: str, seed: int) -> np.ndarray:
        gen = Generator(DEFAULT, unet_precision=precision)
        return gen.generate(list(PROMPTS), num=1, seed=seed).astype(np.int16)

    ref = images("fp32", 0)
    gap = float(np.abs(ref - np.roll(ref, 1, axis=0)).mean())
    for precision in ("int8", "int8-qdq"):
        assert image_check(precision, np.abs(images(precision, 0) - ref), gap)[0], precision
    assert not image_check("int8", np.abs(images("fp32", 1) - ref), gap)[0]
    assert not image_check("int8", np.abs(ref), gap)[0]  # all black
    assert not image_check("fp32", np.abs(images("int8", 0) - ref), gap)[0]


@pytest.mark.slow
def test_doctor_on_a_machine_without_gpu():
    from ddpm_rt.backends.gpu import probe

    if probe().gpu:
        pytest.skip("this machine has a GPU: doctor checks it for real")
    proc = run_cli("doctor", "--no-build", check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "ort (CPUExecutionProvider)           yes" in out
    assert "only the CPU backend (ONNX Runtime) is usable here" in out
    for line in out.splitlines():
        if line.startswith(("trt (", "ort (CUDA", "ort (Tensorrt")):
            assert " no " in line and len(line.split(" no ", 1)[1].strip()) > 10  # and why
    for precision in ("int8", "fp16", "int8-qdq"):
        assert any(
            ln.startswith(f"ort      {precision} ") and " ok: " in ln for ln in out.splitlines()
        )
    assert "all checks passed" in out
    # which kernel family measured it, said plainly (issue 25)
    from ddpm_rt.backends import cpu_kernels

    assert f"this CPU: {cpu_kernels.family()} (" in out


# -- the symmetric Q/DQ int8 graph TensorRT consumes ------------------------------------------
def test_qdq_check_refuses_what_tensorrt_cannot_take():
    from ddpm_rt import Bundle
    from ddpm_rt.export.quantize import qdq_problems

    b = Bundle.load(DEFAULT, hash_all=False)
    assert "QOperator" in qdq_problems(b.graph_bytes(b.unet_precisions["int8"]))
    assert qdq_problems(b.graph_bytes("unet")) == "it has no QuantizeLinear/DequantizeLinear nodes"
    good = b.graph_bytes(b.unet_precisions["int8-qdq"])
    assert qdq_problems(good) is None
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(good)
    zp = next(
        i
        for i in m.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and "zero_point" in i.name
    )
    arr = numpy_helper.to_array(zp).copy()
    arr.flat[0] = 3
    zp.CopyFrom(numpy_helper.from_array(arr, zp.name))
    assert "non-zero zero-point" in qdq_problems(m.SerializeToString())


def test_shipped_qdq_variant_is_symmetric_and_close():
    from ddpm_rt import Bundle, Generator

    b = Bundle.load(DEFAULT, hash_all=False)
    entry = b.manifest["unet_precisions"]["int8-qdq"]
    assert entry["checks"]["mean_cosine"] >= 0.98
    assert entry["checks"]["min_cosine_t_over_T_10"] >= 0.99
    # as close to fp32 as the CPU's int8 graph (measured: 8.4 vs 8.9 levels mean difference)
    kw = {"num": 4, "seed": 3, "sampler": "ddim", "steps": 20, "eta": 0.0}  # deterministic
    prompts = ["red apple", "a dog", "pizza", "sun"]
    a = Generator(DEFAULT).generate(prompts, **kw).astype(int)
    q = Generator(DEFAULT, unet_precision="int8-qdq").generate(prompts, **kw).astype(int)
    i = Generator(DEFAULT, unet_precision="int8").generate(prompts, **kw).astype(int)
    assert 0 < np.abs(a - q).mean() <= 1.25 * np.abs(a - i).mean()


# -- on a GPU with TensorRT (skipped elsewhere, with the reason) ------------------------------
def _gpu_reason() -> str | None:
    from ddpm_rt.backends.gpu import probe

    r = probe()
    return r.tensorrt_why or r.cuda_python_why or (None if r.gpu else r.gpu_why)


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_trt_engine_matches_ort_cpu(tmp_path, precision):
    why = _gpu_reason()
    if why:
        pytest.skip(why)
    from ddpm_rt import Generator
    from ddpm_rt.backends.trt_build import build_engines
    from ddpm_rt.parity import compare, record

    build_engines(DEFAULT, (precision,), EngineCache(tmp_path), log=lambda s: None)
    ref = Generator(DEFAULT, unet_precision="fp32")
    gen = Generator(DEFAULT, backend="trt", unet_precision=precision, engine_cache=tmp_path)
    feeds = record(ref, np.stack([ref.context(p) for p in ("red apple", "a dog")]), every=25)
    T = ref.schedule.timesteps
    ts = np.concatenate([np.rint(f["t"][:, 0] * T).astype(int) for f in feeds])
    got = [gen.backend.run(gen.unet_graph, f)["eps"] for f in feeds]
    want = [ref.backend.run("unet", f)["eps"] for f in feeds]
    ok, figures = compare(("trt", precision), got, want, ts, T)
    assert ok, figures
    # a batch larger than the profile runs in slices; a second thread has its own context
    big = {k: np.concatenate([v] * 5) for k, v in feeds[0].items()}
    assert gen.backend.run(gen.unet_graph, big)["eps"].shape == big["x"].shape


@pytest.mark.gpu
def test_ort_cuda_provider_with_io_binding_matches_cpu():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    why = _gpu_reason()
    if why and "TensorRT" not in why:
        pytest.skip(why)
    from ddpm_rt import Generator

    prov = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    cpu = Generator(DEFAULT).generate("red apple", num=3, seed=2).astype(int)
    gpu = Generator(DEFAULT, providers=prov).generate("red apple", num=3, seed=2).astype(int)
    diff = np.abs(cpu - gpu)
    assert diff.mean() <= 1.0 and np.percentile(diff, 99) <= 8


def test_probe_names_the_missing_driver():
    """With cuda-python (a dev dependency) on a machine without an NVIDIA driver, the real
    CUDA runtime calls answer, and the probe says the driver is what is missing."""
    from ddpm_rt.backends.gpu import cudart, probe

    try:
        rt = cudart()
    except BackendError as e:
        pytest.skip(str(e))
    if int(rt.cudaDriverGetVersion()[1]) != 0:
        pytest.skip("this machine has an NVIDIA driver")
    r = probe()
    assert r.driver_version == "0.0" and not r.gpu
    assert r.gpu_why == "no NVIDIA driver is installed"


def test_trt_precisions_need_the_qdq_graph_for_int8():
    from ddpm_rt.backends.trt_build import trt_precisions

    assert trt_precisions({"fp32": "unet", "int8": "unet_int8"}) == ("fp32",)  # QOperator: no
    both = {"fp32": "unet", "fp16": "f", "int8": "i", "int8-qdq": "q"}
    assert trt_precisions(both) == ("fp32", "fp16", "int8")


def test_a_distilled_unet_picks_its_own_graphs_and_one_row_per_image():
    """Issue 29: TensorRT's distilled precisions build the distilled graphs (its int8: the
    distilled Q/DQ graph, never the teacher's), a graph that takes w gets a profile with
    ``w`` and one row per image (it makes no unconditional pass), the teacher's keeps twice
    that; a missing one names the command that makes it."""
    from types import SimpleNamespace

    from ddpm_rt.backends.trt_build import flags_for, trt_precisions, unet_graph_for

    teacher, student = unet_io(3, 16, 16, 384), unet_io(3, 16, 16, 384, guidance_input=True)
    variants = {
        "fp32": "unet",
        "int8-qdq": "unet_int8_qdq",
        "distilled": "unet_distilled",
        "distilled-int8": "unet_distilled_int8",  # the CPU's QOperator graph: not TensorRT's
        "distilled-int8-qdq": "unet_distilled_int8_qdq",
    }
    graphs = {g: student if "distilled" in g else teacher for g in variants.values()}
    b = SimpleNamespace(unet_precisions=variants, graphs=graphs)  # what flags_for reads
    assert trt_precisions(variants) == ("fp32", "int8", "distilled", "distilled-int8")
    for p in ("fp32", "int8"):
        prof = flags_for(b, p, 16).profile
        assert "w" not in prof and prof["x"][2][0] == 32
    for p in ("distilled", "distilled-int8", "distilled-int8-qdq"):
        prof = flags_for(b, p, 16).profile
        assert prof["w"] == [[1, 1], [16, 1], [16, 1]] and prof["x"][2][0] == 16
    assert unet_graph_for(b, "distilled-int8") == "unet_distilled_int8_qdq"
    with pytest.raises(
        InputError, match=r"no distilled-fp16 U-Net.*--precision fp16 --of distilled"
    ):
        flags_for(b, "distilled-fp16")
