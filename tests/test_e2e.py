"""Layer 3: train -> export -> generate through the CLI, as a user runs it."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import run_cli

DEFAULT = Path(__file__).resolve().parent.parent / "models" / "default"


def test_cli_generate_is_reproducible(trained, tmp_path):
    b = str(trained["bundle"])
    for name, extra in (("ddpm", []), ("ddim", ["--sampler", "ddim", "--steps", "25"])):
        paths = []
        for k in range(2):
            p = tmp_path / f"{name}{k}.png"
            run_cli("--model", b, "--prompt", "red circle", "--seed", "1", "--out", str(p), *extra)
            paths.append(p)
        assert paths[0].read_bytes() == paths[1].read_bytes(), name
        img = np.asarray(Image.open(paths[0]))
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and img.std() > 0
    other = tmp_path / "seed2.png"
    run_cli("--model", b, "--prompt", "red circle", "--seed", "2", "--out", str(other))
    assert other.read_bytes() != (tmp_path / "ddpm0.png").read_bytes()


def test_cli_grid_and_api_agree(trained, tmp_path):
    from ddpm_rt import Generator

    p = tmp_path / "grid.png"
    run_cli(
        "generate",
        "--model",
        str(trained["bundle"]),
        "--prompt",
        "Blue  Square",
        "--num",
        "4",
        "--sampler",
        "ddim",
        "--steps",
        "10",
        "--seed",
        "5",
        "--out",
        str(p),
        "--batch-size",
        "3",
    )
    grid = np.asarray(Image.open(p))
    assert grid.shape == (2 * 17 + 1, 2 * 17 + 1, 3)
    images = Generator(trained["bundle"]).generate(
        "blue square", num=4, sampler="ddim", steps=10, seed=5, batch_size=3
    )
    assert images.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(grid[1:17, 1:17], images[0])
    np.testing.assert_array_equal(grid[18:34, 18:34], images[3])


def test_guidance_batches_conditional_and_unconditional_rows(trained):
    from ddpm_rt import Generator

    gen = Generator(trained["bundle"])
    from ddpm_rt.config import FALLBACK

    kw = {"num": 2, "sampler": "ddim", "steps": 5, "seed": 3}
    default = gen.generate("green triangle", **kw)
    plain = gen.generate("green triangle", guidance=1.0, **kw)
    guided = gen.generate("green triangle", guidance=3.0, **kw)
    # a bundle with no recommended settings gets the fallback guidance (2): a guided run
    np.testing.assert_array_equal(
        default, gen.generate("green triangle", guidance=FALLBACK["guidance"], **kw)
    )
    assert FALLBACK["guidance"] != 1.0 and not np.array_equal(default, plain)
    assert not np.array_equal(plain, guided)
    # guidance 0 is the unconditional model: the same as the empty prompt.
    np.testing.assert_array_equal(
        gen.generate("green triangle", num=2, sampler="ddim", steps=5, seed=3, guidance=0.0),
        gen.generate("", guidance=1.0, **kw),
    )


def test_export_is_idempotent(trained):
    assert "parity unet batch 1" in trained["export_log"]
    assert "parity unet batch 8" in trained["export_log"]
    before = (trained["bundle"] / "manifest.json").read_bytes()
    again = run_cli("export", str(trained["ckpt"]), "--out", str(trained["bundle"]))
    assert "reusing" in again.stderr and "up to date" in again.stderr
    assert (trained["bundle"] / "manifest.json").read_bytes() == before
    m = json.loads(before)
    assert m["schema_version"] == 1 and set(m["files"]) == {"unet.onnx"}
    assert m["conditioning"]["kind"] == "label" and len(m["conditioning"]["label_names"]) == 12


def test_runtime_never_imports_torch(trained, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from ddpm_rt.cli import main
        rc = main(["--model", {str(trained["bundle"])!r}, "--prompt", "yellow square",
                   "--sampler", "ddim", "--steps", "5", "--out", {str(tmp_path / "x.png")!r}])
        assert rc == 0, rc
        from ddpm_rt import Generator
        Generator({str(trained["bundle"])!r}).generate("red square", sampler="ddim", steps=3)
        assert "torch" not in sys.modules, "torch was imported"
        print("torch-free")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "torch-free" in proc.stdout


def test_info(trained):
    out = run_cli("info", str(trained["bundle"])).stdout
    assert "3x16x16" in out and "red circle" in out and "unet.onnx" in out


def test_bench_reports_latency(trained, tmp_path):
    out = run_cli(
        "bench",
        str(trained["bundle"]),
        "--batch-sizes",
        "1,2",
        "--repeats",
        "2",
        "--no-compile",  # inductor compiles C++ per batch size: minutes (BENCHMARKS.md has it)
        "--json",
        str(tmp_path / "b.json"),
    ).stdout
    r = json.loads((tmp_path / "b.json").read_text())
    rows = r["unet_per_step"]
    assert [row["batch"] for row in rows["ddpm-rt fp32"]] == [1, 2]
    assert all(row["ms_per_step"] > 0 for row in rows["ddpm-rt fp32"])
    # torch rows: the same weights, mapped back from the ONNX graph and parity-checked
    assert "tolerance table" in rows["parity"] and len(rows["torch eager"]) == 2
    e2e = r["end_to_end_1_image"]
    assert {"default", "ddpm-500", "dpm++2m-sde-10", "torch course DDPM-500"} <= set(e2e)
    assert r["unet_flops_per_image_step"] > 1e6 and r["peak_gflops"] > 1
    assert all(0 <= o["overhead_fraction"] < 1 for o in r["sampler_overhead"])
    assert r["cold_start"]["ddpm_rt"]["torch_imported"] is False
    assert r["cold_start"]["speedup"] > 0
    assert "vs torch course DDPM" in out


def test_bench_compares_two_bundles_in_one_run(trained, tmp_path):
    """--compare times another bundle's fp32 U-Net in the same run and reports the ratio."""
    out = run_cli(
        "bench",
        str(trained["bundle"]),
        "--sections",
        "unet",
        "--batch-sizes",
        "1",
        "--repeats",
        "5",
        "--compare",
        str(DEFAULT),
        "--json",
        str(tmp_path / "b.json"),
    ).stdout
    r = json.loads((tmp_path / "b.json").read_text())
    assert len(r["unet_per_step"]["compare fp32"]) == 1
    assert r["unet_cost_vs_compare"]["batch_1"] > 0
    assert "U-Net per-step cost vs" in out
    proc = run_cli("bench", "--compare", str(tmp_path), check=False)
    assert proc.returncode == 1 and "manifest" in proc.stderr
