"""``ddpm-rt doctor`` and scripts/gpu_check.sh on a latent bundle: the decoder checked on
every backend a machine offers (TensorRT and ONNX Runtime's CUDA provider through the
doubles of tests/doubles/), what cannot run listed with the reason."""

from __future__ import annotations

from pathlib import Path

import doubles
import pytest
from decoder_variants import latent_variants

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def latent(latent_trained, tmp_path_factory) -> dict:
    """The latent fixture's bundle, and copies with fp16 + Q/DQ or QOperator int8 decoders."""
    return latent_variants(latent_trained["bundle"], tmp_path_factory.mktemp("decoders"))


# -- doctor -----------------------------------------------------------------------------------
def _doctor(bundle, cache, build=True) -> tuple[int, list[str]]:
    from ddpm_rt.tools.doctor import run_doctor

    lines: list[str] = []
    rc = run_doctor(bundle, cache, build=build, log=lines.append)
    return rc, lines


def _decoder_rows(lines: list[str]) -> list[str]:
    start = next(i for i, ln in enumerate(lines) if ln.startswith("decoder ("))
    return lines[start + 1 :]


def test_doctor_on_a_latent_bundle_without_a_gpu(monkeypatch, tmp_path, latent):
    doubles.install(monkeypatch, tensorrt=None, devices=())
    rc, lines = _doctor(latent["qdq"], tmp_path, build=False)
    rows = _decoder_rows(lines)
    assert rc == 0, "\n".join(lines)
    from ddpm_rt.tolerances import TOLERANCES

    assert rows[0].split()[:2] == ["ort", "fp32"] and rows[0].endswith("reference")
    for p in ("fp16", "int8"):  # the CPU's variants: checked when the table says how
        if ("ort", f"decoder-{p}") in TOLERANCES:
            assert any(r.split()[:2] == ["ort", p] and " ok: " in r for r in rows), rows
        else:
            assert f"skipped: ort decoder {p}: no tolerance-table entry" in rows, rows
    assert any(r.startswith("skipped: ort-gpu decoder: this onnxruntime has no CUDA") for r in rows)
    assert any(r.startswith("skipped: trt decoder: TensorRT is not installed") for r in rows)


def test_doctor_checks_the_decoder_on_tensorrt(monkeypatch, tmp_path, latent):
    """Every decoder precision on TensorRT against ONNX Runtime CPU fp32, by the tolerance
    table: the doubles' engines agree; one that is off by 3 grey levels fails."""
    from ddpm_rt.backends.trt import TrtBackend

    doubles.install(monkeypatch)
    rc, lines = _doctor(latent["qdq"], tmp_path)
    trt_rows = {r.split()[1]: r for r in _decoder_rows(lines) if r.startswith("trt ")}
    assert rc == 0, "\n".join(lines)
    assert set(trt_rows) == {"fp32", "fp16", "int8"}
    assert all(" ok: " in r for r in trt_rows.values()), trt_rows
    run = TrtBackend.run

    def off(self, graph, feeds):
        out = run(self, graph, feeds)
        return {k: v + 0.024 for k, v in out.items()} if graph == "decoder" else out

    monkeypatch.setattr(TrtBackend, "run", off)
    rc, lines = _doctor(latent["plain"], tmp_path)
    trt_rows = [r for r in _decoder_rows(lines) if r.startswith("trt ")]
    assert rc == 1 and len(trt_rows) == 1 and " FAILED: " in trt_rows[0], "\n".join(lines)


def test_doctor_tries_the_decoder_on_the_cuda_provider(monkeypatch, tmp_path, latent):
    """onnxruntime-gpu without its libraries on a GPU machine: each decoder precision (the
    int8 one only as a Q/DQ graph) is tried on the CUDA provider, and the fall-back to the
    CPU is a failed check with ONNX Runtime's one line, not a pass."""
    from ddpm_rt.backends import ort as ort_backend

    doubles.install(monkeypatch, tensorrt=None)
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: list(gpu))
    rc, lines = _doctor(latent["qdq"], tmp_path, build=False)
    assert rc == 1
    for p in ("fp32", "fp16", "int8"):
        assert any(
            ln.startswith(f"decoder ort-gpu {p}: FAILED: ONNX Runtime could not use")
            for ln in lines
        ), lines
    _, lines = _doctor(latent["qop"], tmp_path, build=False)
    assert "skipped: ort-gpu decoder int8: not a Q/DQ graph" in lines
    assert not any(ln.startswith("decoder ort-gpu int8") for ln in lines)


# -- scripts/gpu_check.sh ---------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_script_on_a_latent_bundle(tmp_path, latent):
    """scripts/gpu_check.sh given a latent bundle (with fp16 and Q/DQ int8 decoders), every
    process on the doubles: every decoder engine built, the decoder check passes on each
    precision, the verdict is PASS."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "DDPM_RT_DOUBLES": "10.3.0",
        "PYTHONPATH": str(ROOT / "tests" / "doubles" / "site"),
        "PYTHON": sys.executable,
        "REPORT": str(tmp_path / "report.txt"),
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(latent["qdq"])],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("PASS") and "decoder on TensorRT vs CPU" in ln for ln in lines)
    report = (tmp_path / "report.txt").read_text()
    for p in ("fp32", "fp16", "int8"):
        assert f"building the {p} decoder engine" in report, report
        assert f"trt decoder {p}: ok" in report, report
    assert "build every engine (fp32)" in proc.stdout  # the U-Net precisions it has
    assert "VERDICT: PASS" in proc.stdout
