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
    total = sum(p.stat().st_size for p in DEFAULT.iterdir() if p.is_file())
    assert total < 42e6, total
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
