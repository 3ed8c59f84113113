"""Issue 28: ``ddpm-rt variations IMAGE``, generate --init-image at --num 4 --strength 0.5,
the prompt taken from IMAGE's ddpm-rt settings when --prompt is left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_rt import Generator
from ddpm_rt.images import make_grid, read_provenance

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_variations_reuse_the_pictures_prompt_and_are_the_python_apis(tmp_path):
    src, out = tmp_path / "apple.png", tmp_path / "v.png"
    run_cli("generate", "--prompt", "red apple", "--seed", "2", "--out", str(src))
    run_cli("variations", str(src), "--seed", "1", "--out", str(out))
    want = Generator(DEFAULT).generate(
        "red apple", init_image=src, num=4, strength=0.5, seed=1
    )  # the defaults: four seeds' images, half redrawn
    assert np.array_equal(_pixels(out), make_grid(want))
    p = read_provenance(out)
    assert (p["prompts"], p["num"], p["strength"]) == (["red apple"], 4, 0.5)


def test_variations_with_a_prompt_and_settings_of_their_own(tmp_path):
    rng = np.random.default_rng(1)
    src, out = tmp_path / "noise.png", tmp_path / "v.png"
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(src)
    args = ["--prompt", "a frog", "--num", "2", "--strength", "0.3", "--steps", "6"]
    run_cli("variations", str(src), *args, "--out", str(out))
    want = Generator(DEFAULT).generate(
        "a frog", init_image=src, num=2, strength=0.3, steps=6
    )  # fmt: skip
    assert np.array_equal(_pixels(out), make_grid(want))


def test_variations_need_a_prompt_when_the_picture_has_none(tmp_path):
    src = tmp_path / "plain.png"
    Image.new("RGB", (16, 16), "red").save(src)
    proc = run_cli("variations", str(src), "--out", str(tmp_path / "v.png"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: give --prompt: {src} records no single ddpm-rt prompt to reuse"
    )
    assert not (tmp_path / "v.png").exists()


def test_variations_help_gives_its_own_defaults():
    proc = run_cli("variations", "--help")
    flat = " ".join(proc.stdout.split())
    assert "images per prompt (default 4)" in flat
    assert "to 1 (all: text-to-image); default 0.5" in flat
