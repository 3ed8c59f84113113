"""The shipped default model: present, valid, torch-free, and what `ddpm-rt --prompt` uses."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"
pytestmark = pytest.mark.skipif(
    not (DEFAULT / "manifest.json").is_file(), reason="no default model in models/default"
)


def test_default_bundle_is_small_valid_and_text_conditioned():
    from ddpm_rt import Bundle

    b = Bundle.load(DEFAULT)
    assert b.conditioning["kind"] == "text" and b.context_dim == 384
    assert b.conditioning["text"]["default_precision"] == "int8"
    total = sum(p.stat().st_size for p in DEFAULT.parent.rglob("*") if p.is_file())
    assert total < 110e6, total  # models/ in all (both bundles), precision variants included
    assert set(b.unet_precisions) >= {"fp32", "int8", "fp16"}
    assert (DEFAULT / "MODEL_CARD.md").is_file()


def test_prompt_without_model_uses_the_default(tmp_path):
    out = tmp_path / "apple.png"
    code = textwrap.dedent(f"""
        import sys
        from ddpm_rt.cli import main
        rc = main(["--prompt", "red apple", "--sampler", "ddim", "--steps", "10",
                   "--out", {str(out)!r}, "--no-progress"])
        assert rc == 0 and "torch" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert "text_encoder_int8" in run_cli("info").stdout


def test_similar_prompts_give_similar_contexts():
    from ddpm_rt import Generator

    gen = Generator(DEFAULT)
    boy, man, apple = (gen.context(p) for p in ("boy", "man", "apple"))
    assert boy @ man > boy @ apple
    assert np.isclose(np.linalg.norm(boy), 1.0, atol=1e-4)


def test_shipped_int8_unet_agrees_with_fp32():
    """On x_t recorded from real trajectories, under the tolerance table's int8 entry."""
    from ddpm_rt import Generator
    from ddpm_rt.export.quantize import calibration_contexts
    from ddpm_rt.parity import compare, record

    gen = Generator(DEFAULT)
    int8 = Generator(DEFAULT, unet_precision="int8")
    _, contexts = calibration_contexts(gen, limit=8)
    feeds = record(gen, contexts, every=25)
    T = gen.schedule.timesteps
    ts = np.concatenate([np.rint(f["t"][:, 0] * T).astype(int) for f in feeds])
    ref = [gen.backend.run("unet", f)["eps"] for f in feeds]
    got = [int8.backend.run(int8.unet_graph, f)["eps"] for f in feeds]
    ok, figures = compare(("ort", "int8"), got, ref, ts, T)
    assert ok, figures
    # its images: test_gpu_path.py::test_doctor_image_check_passes_int8_and_fails_another_picture
