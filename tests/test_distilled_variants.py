"""Issue 29, a distilled U-Net's precision variants: ``ddpm-rt quantize BUNDLE --precision
int8|int8-qdq|fp16 --of distilled`` (``distilled-int8``, ``distilled-int8-qdq``,
``distilled-fp16``), calibrated and checked against the distilled fp32 graph along its own
2-step trajectories with w fed; the runtime runs each as it runs the distilled U-Net (one row
per image per step, w fed, its own recommended settings); a variant that misses its check is
refused, leaving the bundle byte-identical; TensorRT (through the doubles of tests/doubles/)
builds the distilled graphs with a ``w`` profile of one row per image; ``ddpm-rt doctor``
checks them against the distilled U-Net. The tiny label models of test_distilled_bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import doubles
import numpy as np
import pytest
from test_distilled_bundle import Counting, ckpts  # noqa: F401 - a fixture

from ddpm_rt.backends import cpu_kernels
from ddpm_rt.backends.engine_cache import EngineCache
from ddpm_rt.bundle.bundle import Bundle
from ddpm_rt.bundle.manifest import GUIDANCE_DISTILLED
from ddpm_rt.errors import InputError
from ddpm_rt.generator import Generator

from conftest import run_cli

# precision -> (graph, file) of each variant ``--of distilled`` makes
NAMES = {
    "distilled-int8": ("unet_distilled_int8", "unet.distilled.int8-qoperator-u8s8.onnx"),
    "distilled-int8-qdq": ("unet_distilled_int8_qdq", "unet.distilled.int8-qdq-s8s8.onnx"),
    "distilled-fp16": ("unet_distilled_fp16", "unet.distilled.fp16.onnx"),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def bundles(ckpts, tmp_path_factory):  # noqa: F811 - ckpts: the imported fixture
    """The teacher's bundle ("plain") and the same with the 2-step guidance-distilled student
    as its ``distilled`` U-Net ("both"): test_distilled_bundle's, exported in this process
    (~2 s, not its CLI runs)."""
    from ddpm_rt.export.distilled_export import add_distilled_variant
    from ddpm_rt.export.onnx_export import export_bundle
    from ddpm_rt.export.tracing import ExportConfig

    d = tmp_path_factory.mktemp("bundles")
    export_bundle(ExportConfig(str(ckpts / "teacher"), str(d / "plain")), log=_quiet)
    shutil.copytree(d / "plain", d / "both")
    student = ExportConfig(str(ckpts / "s" / "steps-2"), str(d / "both"))
    add_distilled_variant(student, d / "both", log=_quiet)
    return d


@pytest.fixture(scope="module")
def variants(bundles, tmp_path_factory):
    """A copy of "both" with all three variants of the student added (~5 s), and the log
    of each."""
    from ddpm_rt.export.quantize import fp16_bundle, quantize_bundle

    b = tmp_path_factory.mktemp("variants") / "b"
    shutil.copytree(bundles / "both", b)
    logs: dict[str, list[str]] = {p: [] for p in NAMES}
    quantize_bundle(b, log=logs["distilled-int8"].append, of="distilled")
    quantize_bundle(b, log=logs["distilled-int8-qdq"].append, precision="int8-qdq", of="distilled")
    fp16_bundle(b, log=logs["distilled-fp16"].append, of="distilled")
    return b, logs


def test_each_variant_is_made_from_the_distilled_unet_and_described(variants):
    """Each entry: its own graph and file (beside the teacher's names), taking w; what the
    student was distilled for and its recommended settings, copied; calibrated and checked
    on the student's own timesteps (50, 25) at w = w_min, recommended, w_max, with enough
    batches; figures within the tolerance table's entries for int8 / fp16."""
    b, logs = variants
    m = json.loads((b / "manifest.json").read_text())
    source = m["unet_precisions"]["distilled"]
    assert m["requires"] == [GUIDANCE_DISTILLED]
    for precision, (graph, file) in NAMES.items():
        entry = m["unet_precisions"][precision]
        assert entry["graph"] == graph and m["graphs"][graph]["file"] == file
        assert [i["name"] for i in m["graphs"][graph]["inputs"]] == ["x", "t", "c", "w"]
        assert entry["distilled"] == source["distilled"]
        assert entry["recommended"] == source["recommended"]
        along = entry["checks"] if precision == "distilled-fp16" else entry["calibration"]
        assert along["timesteps"] == [50, 25] and along["guidance"] == [1.0, 2.0, 4.0]
        assert entry["checks"]["cpu_family"]
        assert f"{precision} vs distilled eps on" in "\n".join(logs[precision])
    for precision in ("distilled-int8", "distilled-int8-qdq"):
        entry = m["unet_precisions"][precision]
        assert entry["calibration"]["batches"] >= 16 and entry["checks"]["heldout_batches"] >= 4
        assert entry["checks"]["mean_cosine"] >= 0.98
        assert entry["checks"]["min_cosine_t_over_T_10"] >= 0.99
    fp16 = m["unet_precisions"]["distilled-fp16"]["checks"]
    assert fp16["batches"] >= 16 and fp16["max_rel_l2"] <= 1e-2
    Bundle.load(b, hash_all=True)


@pytest.mark.parametrize("precision", list(NAMES))
def test_the_runtime_runs_a_variant_as_the_distilled_unet(variants, precision):
    """One U-Net row per image per step with w fed, at the student's recommended 2 steps
    (counted on the backend); a negative prompt refused as for the distilled U-Net; the
    image within a few grey levels of the distilled fp32 one."""
    b, _ = variants
    gen = Generator(b, unet_precision=precision)
    assert gen.unet_graph == NAMES[precision][0] and gen.unet_takes_w
    calls = Counting(gen.backend, gen.unet_graph)
    gen.backend = calls
    images = gen.generate("red circle", num=3, seed=1)
    assert [len(c["x"]) for c in calls.calls] == [3, 3]
    assert all(np.array_equal(c["w"], np.full((3, 1), 2.0, np.float32)) for c in calls.calls)
    assert [round(float(c["t"][0, 0]) * 50) for c in calls.calls] == [50, 25]
    fp32 = Generator(b, unet_precision="distilled").generate("red circle", num=3, seed=1)
    # the Q/DQ graph is TensorRT's; on a CPU without VNNI ONNX Runtime runs its s8 x s8
    # products through a saturating kernel (export/variants.py, REDUCE_RANGE_WHY), which moved
    # this tiny model's picture by up to 21 levels there: its pipeline alone is checked then
    exact = cpu_kernels.int8_kind() == cpu_kernels.U8S8_EXACT
    if exact or not precision.endswith("qdq"):
        assert np.abs(images.astype(int) - fp32).max() <= 8
    with pytest.raises(InputError, match="negative prompt needs the unconditional pass"):
        gen.generate("red circle", negative_prompt="blue square", seed=1)


def _scaled(data: bytes, k: float) -> bytes:
    """The graph with its eps multiplied by ``k``: a conversion gone wrong."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load_from_string(data)
    out = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array(k, np.float32), "k_broken"))
    m.graph.node.append(helper.make_node("Mul", [f"{out}_raw", "k_broken"], [out]))
    return m.SerializeToString()


@pytest.mark.parametrize(
    "precision, convert, k",
    [("int8", "static_int8", -1.0), ("fp16", "fp16_graph", 1.5)],  # cosine -1; rel L2 0.5
)
def test_a_broken_variant_is_refused_and_the_bundle_left(
    bundles,
    tmp_path,
    monkeypatch,
    precision,
    convert,
    k,
):
    from ddpm_rt.export import quantize

    real = getattr(quantize, convert)
    monkeypatch.setattr(quantize, convert, lambda *a, **kw: _scaled(real(*a, **kw), k))
    b = tmp_path / "b"
    shutil.copytree(bundles / "both", b)
    before = _snapshot(b)
    make = quantize.fp16_bundle if precision == "fp16" else quantize.quantize_bundle
    with pytest.raises(quantize.QuantizeError, match=f"distilled-{precision} U-Net misses its"):
        make(b, log=_quiet, of="distilled")
    assert _snapshot(b) == before


def test_of_distilled_is_refused_without_a_distilled_unet_or_with_the_decoder(
    bundles,
    tmp_path,
):
    """One line each, nothing written: the teacher-only bundle has no distilled U-Net;
    ``--graph decoder`` has no distilled decoder."""
    b = tmp_path / "b"
    shutil.copytree(bundles / "plain", b)
    before = _snapshot(b)
    for extra, says in (
        ([], "has no distilled U-Net to convert to int8"),
        (["--graph", "decoder"], "--of applies to the U-Net"),
    ):
        r = run_cli("quantize", str(b), "--of", "distilled", *extra, check=False)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("error: ") and says in r.stderr, r.stderr
    assert _snapshot(b) == before


# -- TensorRT, through the doubles ------------------------------------------------------------
def test_tensorrt_builds_the_distilled_graphs_with_a_w_profile(variants, monkeypatch, tmp_path):
    """Each distilled precision builds its own graph (int8: the Q/DQ one), its profile with
    ``w`` and one row per image (2), the teacher's twice that (guidance rows) and no ``w``;
    so does ONNX Runtime's TensorRT provider, never given the CPU's QOperator graph."""
    from ddpm_rt.backends import tensorrt_graphs
    from ddpm_rt.backends.trt_build import build_engines

    b, _ = variants
    doubles.install(monkeypatch)
    cache = EngineCache(tmp_path / "engines")
    wanted = ("fp32", "distilled", "distilled-fp16", "distilled-int8")
    records = build_engines(b, wanted, cache, max_images=2, log=_quiet)
    assert [r.graph for r in records] == [
        "unet", "unet_distilled", "unet_distilled_fp16", "unet_distilled_int8_qdq"
    ]  # fmt: skip
    teacher, *students = records
    assert "w" not in teacher.flags.profile and teacher.flags.profile["x"][2][0] == 4
    for r in students:
        assert r.flags.profile["w"] == [[1, 1], [2, 1], [2, 1]]
        assert r.flags.profile["x"][2][0] == 2
    on_ort_trt = tensorrt_graphs(Bundle.load(b))
    assert on_ort_trt["unet_distilled"]["profile"]["w"][2] == [16, 1]
    assert on_ort_trt["unet_distilled_int8_qdq"]["qdq"]
    assert "unet_distilled_int8" not in on_ort_trt  # the CPU's QOperator graph


def _without(bundle: Path, precision: str, out: Path) -> Path:
    """A copy of ``bundle`` without its ``precision`` U-Net (entry, graph and file)."""
    shutil.copytree(bundle, out)
    m = json.loads((out / "manifest.json").read_text())
    file = m["graphs"].pop(m["unet_precisions"].pop(precision)["graph"])["file"]
    del m["files"][file]
    (out / file).unlink()
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    return out


def test_the_trt_generator_runs_distilled_int8_as_the_distilled_unet(
    variants, monkeypatch, tmp_path
):
    """TensorRT's distilled-int8 is the bundle's distilled-int8-qdq (here its only int8
    entry): the Generator reads what it was distilled for there, feeds w, makes one row per
    image at its 2 recommended steps, and matches ONNX Runtime's CPU on the same graph."""
    from ddpm_rt.backends.trt_build import build_engines

    b = _without(variants[0], "distilled-int8", tmp_path / "b")
    doubles.install(monkeypatch)
    cache = EngineCache(tmp_path / "engines")
    build_engines(b, ("distilled-int8",), cache, max_images=2, log=_quiet)
    gen = Generator(b, backend="trt", unet_precision="distilled-int8", engine_cache=cache.root)
    assert gen.unet_graph == "unet_distilled_int8_qdq" and gen.unet_takes_w
    calls = Counting(gen.backend, gen.unet_graph)
    gen.backend = calls
    images = gen.generate("red circle", num=3, seed=1)  # 3 rows: sliced 2 + 1 by the engine
    assert [len(c["x"]) for c in calls.calls] == [3, 3] and all("w" in c for c in calls.calls)
    cpu = Generator(b, unet_precision="distilled-int8-qdq").generate("red circle", num=3, seed=1)
    assert np.abs(images.astype(int) - cpu).max() <= 2
    calls.inner.close()


def test_doctor_checks_the_variants_against_the_distilled_unet(variants, monkeypatch, tmp_path):
    """A reference row for the distilled U-Net beside fp32's; each distilled variant on ONNX
    Runtime's CPU and TensorRT checked against it (eps figures by the tolerance table's base
    precision's entry; fp16 and TensorRT fp32 pass)."""
    from ddpm_rt.tools.doctor import run_doctor

    b, _ = variants
    doubles.install(monkeypatch)
    lines: list[str] = []
    run_doctor(b, tmp_path / "engines", log=lines.append)
    rows = {tuple(ln.split()[:2]): ln for ln in lines if ln.startswith(("ort ", "trt "))}
    assert rows[("ort", "fp32")].endswith("reference")
    assert rows[("ort", "distilled")].endswith("reference")
    for key in [("ort", p) for p in NAMES] + [("trt", "distilled-int8")]:
        assert "eps mean_cosine" in rows[key] or "eps max_rel_l2" in rows[key], rows[key]
    for key in (("ort", "distilled-fp16"), ("trt", "distilled"), ("trt", "distilled-fp16")):
        assert " ok: eps " in rows[key], rows[key]
