"""The same bundle computes the same int8 numbers on every CPU kernel family (issue 25).

ONNX Runtime picks its CPU kernels from CPUID, with no switch. Two ways to run this suite's
Python on another family than the machine's own, both on any x86-64 machine here:

- the CPUID mask (tests/cpuid/cpuid_mask.c, LD_PRELOAD): this CPU at native speed, its
  AVX-512/VNNI/AMX bits hidden, so ONNX Runtime and NumPy choose their AVX2 kernels (needs
  CPUID faulting: Linux on most x86-64 CPUs since Ivy Bridge / Zen; skipped where absent);
- QEMU's user-mode emulator (Debian ``qemu-user``, installed by .ci/run) presenting a
  Haswell CPU model: slow (about 160x), so it runs a quarter of the inputs.

The int8 graphs keep 7-bit weights so that no family's dot products saturate
(:data:`ddpm_rt.export.variants.REDUCE_RANGE_WHY`); the tests demand the same bytes of eps
and of contexts on both families, and the tolerance table's parity on each. With the 8-bit
graphs shipped before, the masked family's eps and contexts differ and its late cosine is
0.989 < 0.99 (the issue's figure, reproduced both ways).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddpm_rt.backends import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"
CPUID = ROOT / "tests" / "cpuid"
FAMILY = "from ddpm_rt.backends import cpu_kernels; print(cpu_kernels.family())"
QEMU_CPU = "Haswell-v4"  # AVX2 + FMA, no AVX-512 (QEMU 7.2's TCG emulates AVX2, not AVX-512)


def masked_here() -> bool:
    """This process already runs under the CPUID mask (.ci/run's second pass)."""
    return "cpuid_mask" in os.environ.get("LD_PRELOAD", "")


@pytest.fixture(scope="session")
def cpuid_mask(tmp_path_factory) -> dict[str, str]:
    """An environment whose child processes see this x86-64 CPU without AVX-512 and VNNI."""
    if platform.machine() != "x86_64":
        pytest.skip(f"the CPUID mask is for x86-64 (this is {platform.machine()})")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build tests/cpuid/cpuid_mask.c")
    lib = tmp_path_factory.mktemp("cpuid") / "libcpuid_mask.so"
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(CPUID / "cpuid_mask.c"), "-ldl"],
        check=True,
    )
    env = {**os.environ, "LD_PRELOAD": str(lib), "DDPM_RT_CPUID_MASK_REPORT": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", FAMILY], env=env, capture_output=True, text=True, check=True
    )
    if "cpuid_mask: armed" not in probe.stderr:
        pytest.skip(f"the CPUID mask cannot run here: {probe.stderr.strip()}")
    return env


@pytest.fixture(scope="session")
def qemu() -> list[str]:
    exe = shutil.which("qemu-x86_64")
    if platform.machine() != "x86_64" or exe is None:
        pytest.skip("QEMU's x86-64 user-mode emulator is not installed (Debian qemu-user)")
    return [exe, "-cpu", QEMU_CPU]


def test_probe_graph_is_the_documented_matmulinteger():
    """The embedded probe is exactly MatMulInteger(uint8 a, int8 b) -> int32, opset 13."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "u8s8_probe",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", "k"]),
            helper.make_tensor_value_info("b", TensorProto.INT8, ["k", "n"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", "n"])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8, producer_name="ddpm-rt"
    )
    onnx.checker.check_model(model)
    assert model.SerializeToString() == cpu_kernels.PROBE_ONNX


def test_probe_sums_small_products_exactly():
    """Below saturation every family gives the true integer product."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, (3, 10), dtype=np.uint8)
    b = rng.integers(-60, 60, (10, 5), dtype=np.int8)
    got = cpu_kernels.u8s8_sum(a, b)
    np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_probe_names_this_cpus_family_and_the_masked_one(cpuid_mask):
    flags = _cpu_flags()
    if masked_here():
        want = cpu_kernels.U8S8_SATURATING
    elif {"avx512_vnni", "avx_vnni"} & flags:
        want = cpu_kernels.U8S8_EXACT
    else:
        want = cpu_kernels.U8S8_SATURATING
    assert cpu_kernels.family() == f"x86_64/{want}", flags & {"avx2", "avx512bw", "avx512_vnni"}
    masked = subprocess.run(
        [sys.executable, "-c", FAMILY], env=cpuid_mask, capture_output=True, text=True, check=True
    )
    assert masked.stdout.strip() == f"x86_64/{cpu_kernels.U8S8_SATURATING}"


@pytest.fixture(scope="session")
def feeds_npz(tmp_path_factory) -> Path:
    """x_t recorded along the shipped fp32 U-Net's DDPM trajectories (8 prompts, every 25th
    timestep: 21 batches of 8), its eps on them, and the prompts for the text encoder."""
    from ddpm_rt import Generator
    from ddpm_rt.export.quantize import calibration_contexts
    from ddpm_rt.parity import record
    from ddpm_rt.tools.doctor import PROMPTS

    gen = Generator(DEFAULT, threads=1)
    _, contexts = calibration_contexts(gen, limit=8)
    feeds = record(gen, contexts, every=25, batch=8)
    ref = [gen.backend.run("unet", f)["eps"] for f in feeds]
    out = tmp_path_factory.mktemp("feeds")
    stack = {k: np.stack([f[k] for f in feeds]) for k in "xtc"}
    np.savez(out / "all.npz", **stack, ref=np.stack(ref), prompts=np.array(PROMPTS))
    # every 4th batch of t > 1 (t = 500, 400, ..., 100): a quarter of the rows, for QEMU
    quarter = np.arange(0, len(feeds) - 1, 4)
    np.savez(
        out / "quarter.npz",
        **{k: v[quarter] for k, v in stack.items()},
        ref=np.stack(ref)[quarter],
        prompts=np.array(PROMPTS[:2]),
    )
    return out


def _figures(feeds: Path, prefix: list[str] | None = None, env: dict | None = None) -> dict:
    env = {**(env or os.environ), "PYTHONWARNINGS": "ignore"}
    cmd = [*(prefix or []), sys.executable, str(CPUID / "family_figures.py"), str(feeds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_numbers(here: dict, there: dict) -> None:
    for run in (here, there):
        assert run["ok"], f"int8 parity misses on {run['family']}: {run['figures']}"
    if here["family"] == there["family"]:
        pytest.skip(f"both runs are on {here['family']}: nothing to compare across families")
    for key in ("int8_eps_sha256", "contexts_sha256"):
        assert here[key] == there[key], (
            f"{key}: {here['family']} and {there['family']} compute different numbers "
            f"(int8 figures {here['figures']} vs {there['figures']})"
        )


@pytest.mark.slow
def test_int8_graphs_compute_the_same_numbers_on_avx2_kernels(feeds_npz, cpuid_mask):
    """About 20 s: the whole recorded set, natively and under the CPUID mask."""
    here = _figures(feeds_npz / "all.npz")
    masked = _figures(feeds_npz / "all.npz", env=cpuid_mask)
    assert masked["family"] == f"x86_64/{cpu_kernels.U8S8_SATURATING}"
    _same_numbers(here, masked)


@pytest.mark.slow
def test_int8_graphs_compute_the_same_numbers_under_qemu_haswell(feeds_npz, qemu, tmp_path):
    """About 2 minutes (QEMU): a quarter of the recorded set, natively and emulated."""
    env = {**os.environ, "DDPM_RT_CACHE": str(tmp_path / "cache")}
    env.pop("LD_PRELOAD", None)  # the emulator presents its own CPU model
    here = _figures(feeds_npz / "quarter.npz", env=env)
    emulated = _figures(feeds_npz / "quarter.npz", prefix=qemu, env=env)
    assert emulated["family"] == f"x86_64/{cpu_kernels.U8S8_SATURATING}"
    _same_numbers(here, emulated)


def test_doctor_says_when_a_figure_was_measured_on_another_family(tmp_path):
    """A manifest whose int8 figures were recorded on another family: doctor says so, and
    for a CPU int8 row that failed here, what to use instead."""
    import copy

    from ddpm_rt import Bundle
    from ddpm_rt.tools.doctor import cpu_family_notes, recorded_families

    bundle = Bundle.load(DEFAULT, hash_all=False)
    here = cpu_kernels.family()
    rec = recorded_families(bundle)
    assert rec["U-Net int8"].startswith(("x86_64/", "aarch64/"))
    assert rec["text encoder int8"] == rec["U-Net int8"]
    other = "aarch64/u8s8-exact" if here != "aarch64/u8s8-exact" else "x86_64/u8s8-saturating"
    m = copy.deepcopy(bundle.manifest)
    m["unet_precisions"]["int8"]["checks"]["cpu_family"] = other
    bundle.manifest = m
    rows = [("ort", "fp32", "reference", 1, 1), ("ort", "int8", "FAILED: eps ...", 1, 1)]
    notes = "\n".join(cpu_family_notes(bundle, rows))
    assert f"this CPU: {here} (" in notes
    assert f"U-Net int8: its figures in the manifest were measured on {other}, not" in notes
    assert "int8 misses its check on this CPU: use --precision fp32 here" in notes
    del m["unet_precisions"]["int8"]["checks"]["cpu_family"]  # written before issue 25
    notes = "\n".join(cpu_family_notes(bundle, rows))
    assert "U-Net int8: its figures in the manifest do not say on which CPU family" in notes
    for junk in ([1, 2], "x" * 10_000, None, {"cpu_family": 7}):  # untrusted: any type
        m["unet_precisions"]["int8"]["checks"] = junk
        assert recorded_families(bundle)["U-Net int8"] == "not recorded"
    ok_rows = [("ort", "fp32", "reference", 1, 1), ("ort", "int8", "ok: eps ...", 1, 1)]
    assert "use --precision fp32" not in "\n".join(cpu_family_notes(bundle, ok_rows))


@pytest.mark.slow
def test_doctor_passes_on_avx2_kernels(cpuid_mask):
    """`ddpm-rt doctor` on the shipped bundle with the AVX-512/VNNI kernels hidden: every
    check passes (it ended "1 check(s) FAILED" there before), and it names the family."""
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_rt.cli", "doctor", "--no-build"],
        env={**cpuid_mask, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"this CPU: x86_64/{cpu_kernels.U8S8_SATURATING}" in proc.stdout
    assert "all checks passed" in proc.stdout


# The int8 graph's eps on fixed inputs, as this process's kernels compute them (sha256).
INT8_DIGEST = """
import hashlib, sys
import numpy as np
from ddpm_rt import Generator
gen = Generator(sys.argv[1], unet_precision="int8", threads=1)
d = np.load(sys.argv[2])
run = lambda i: gen.backend.run(gen.unet_graph, {k: d[f"{k}{i}"] for k in "xtc"})["eps"]
out = [run(i).tobytes() for i in range(len(d.files) // 3)]
print(hashlib.sha256(b"".join(out)).hexdigest())
"""


@pytest.mark.slow
def test_quantize_writes_a_graph_every_family_computes_alike(trained, tmp_path, cpuid_mask):
    """`ddpm-rt quantize` itself (not only the shipped file): the int8 graph it writes for the
    test model gives the same eps bytes on VNNI and on AVX2 kernels, on x_t recorded along
    that model's own trajectories (8-bit weights: different bytes)."""
    import shutil

    from ddpm_rt import Generator
    from ddpm_rt.export.quantize import quantize_bundle
    from ddpm_rt.parity import record

    b = tmp_path / "b"
    shutil.copytree(trained["bundle"], b)
    quantize_bundle(b, log=lambda s: None)
    gen = Generator(b)
    contexts = np.eye(gen.bundle.context_dim, dtype=np.float32)
    feeds = record(gen, contexts, every=5, batch=8)
    np.savez(tmp_path / "feeds.npz", **{f"{k}{i}": f[k] for i, f in enumerate(feeds) for k in f})
    digests = []
    for env in (os.environ, cpuid_mask):
        proc = subprocess.run(
            [sys.executable, "-c", INT8_DIGEST, str(b), str(tmp_path / "feeds.npz")],
            env={**env, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True,
            timeout=300, check=True,
        )  # fmt: skip
        digests.append(proc.stdout.strip())
    if masked_here():
        pytest.skip("this pass already runs on AVX2 kernels: both digests are of one family")
    assert digests[0] == digests[1]
