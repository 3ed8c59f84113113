"""The shipped default model: present, valid, torch-free, and what `ddpm-rt --prompt` uses."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"
LATENT64 = DEFAULT.parent / "latent64"
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


@pytest.mark.skipif(not (LATENT64 / "manifest.json").is_file(), reason="no models/latent64")
def test_latent64_ships_beside_the_default_and_draws_64x64_without_torch(tmp_path):
    """The 64x64 latent model (issue 19) is a valid latent bundle with its card, stays out of
    the wheel, and `ddpm-rt --model models/latent64` draws prompt-dependent 64x64 pictures."""
    import tomllib

    from ddpm_rt import Bundle

    b = Bundle.load(LATENT64)
    assert "latent" in b.manifest["requires"]
    assert (b.image_shape, b.sample_shape) == ((3, 64, 64), (4, 16, 16))
    assert set(b.decoder_precisions) == {"fp32", "fp16"} and set(b.unet_precisions) >= {"fp16"}
    assert (LATENT64 / "MODEL_CARD.md").is_file()
    data = tomllib.loads((DEFAULT.parents[1] / "pyproject.toml").read_text())
    shipped = data["tool"]["setuptools"]["package-data"]["ddpm_rt.models"]
    assert shipped and all(p.startswith("default/") for p in shipped)  # the wheel: default only
    outs = [tmp_path / "apple.png", tmp_path / "rocket.png"]
    code = textwrap.dedent(f"""
        import sys
        from ddpm_rt.cli import main
        for prompt, out in (("red apple", {str(outs[0])!r}), ("a rocket", {str(outs[1])!r})):
            assert main(["--model", {str(LATENT64)!r}, "--prompt", prompt, "--seed", "3",
                         "--out", out, "--no-progress"]) == 0
        assert "torch" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    a, r = (np.asarray(Image.open(p).convert("RGB"), np.float32) for p in outs)
    assert a.shape == r.shape == (64, 64, 3)
    assert np.abs(a - r).mean() > 10  # the prompt reaches the picture
    # an apple is red: more red than green or blue over the drawn (non-white) pixels
    drawn = a[a.min(axis=2) < 200]
    assert drawn[:, 0].mean() > drawn[:, 1].mean() + 30 and drawn[:, 0].mean() > drawn[:, 2].mean()
