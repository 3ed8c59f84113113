"""Issue 28, first step: starting from a picture (SDEdit) and inpainting (mask blending,
RePaint's jumps) in the sampling run, the Python API and the CLI, with the determinism
contract of text-to-image and the noise rule of docs/bundle-format.md ("Noise", 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm_rt import Generator
from ddpm_rt.core.noise import ImageNoise
from ddpm_rt.core.samplers import to_uint8
from ddpm_rt.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"
SAMPLERS = [
    ("ddpm", None),
    ("ddim", "time"),
    ("ddim", "logsnr"),
    ("dpm++2m", "time"),
    ("dpm++2m", "logsnr"),
    ("dpm++2m-sde", "time"),
    ("dpm++2m-sde", "logsnr"),
]


@pytest.fixture(scope="module")
def gen():
    return Generator(DEFAULT)


@pytest.fixture(scope="module")
def picture(gen):
    return gen.generate("red apple", seed=3)[0]  # (64, 64, 3): the cascade's picture


@pytest.fixture(scope="module")
def left_half():
    m = np.zeros((64, 64), bool)
    m[:, :32] = True  # repaint the left half, keep the right
    return m


@pytest.mark.parametrize("sampler,spacing", SAMPLERS)
def test_strength_one_is_text_to_image_byte_for_byte(gen, picture, sampler, spacing):
    kw = {"sampler": sampler, "spacing": spacing, "num": 2, "seed": 4}
    want = gen.generate("a cat", **kw)
    assert np.array_equal(gen.generate("a cat", init_image=picture, strength=1.0, **kw), want)


def test_strength_zero_returns_the_input(gen, picture):
    got = gen.generate("a cat", num=2, init_image=picture, strength=0.0)
    assert np.array_equal(got, np.stack([picture, picture]))
    base = gen.generate("a cat", init_image=picture, strength=0.0, size=16)[0]
    box = picture.astype(np.float32).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    assert np.abs(base.astype(float) - box).max() <= 0.5 + 1e-3  # the box average, rounded


@pytest.mark.parametrize("sampler,spacing", SAMPLERS)
def test_inpainting_keeps_the_kept_region_exactly_and_batches_like_alone(
    gen, picture, left_half, sampler, spacing
):
    strength = 0.05 if sampler == "ddpm" else 0.7  # ddpm takes all 500 steps
    kw = {"sampler": sampler, "spacing": spacing, "seed": 8, "num": 2, "strength": strength}
    both = gen.generate(
        ["red apple", "a blue car"], init_image=picture, mask=left_half, resample=1, **kw
    )
    alone = gen.generate("a blue car", init_image=picture, mask=left_half, resample=1, **kw)
    assert np.array_equal(both[2:], alone)  # the same alone or beside another prompt
    kept = np.broadcast_to(picture[:, 32:], both[:, :, 32:].shape)
    assert np.array_equal(both[:, :, 32:], kept)
    assert np.abs(both[:, :, :32].astype(int) - picture[:, :32]).mean() > 1  # redrawn


def test_variations_differ_from_the_input_more_as_strength_grows(gen, picture):
    diffs = [
        np.abs(gen.generate("red apple", num=4, seed=9, init_image=picture, strength=s).astype(int)
               - picture).mean()
        for s in (0.3, 0.6, 0.9)
    ]  # fmt: skip
    assert 0 < diffs[0] < diffs[1] < diffs[2], diffs


def test_the_noise_rule_reproduces_a_run_from_the_spec(gen, picture, left_half):
    """docs/bundle-format.md "Noise" 4, written out here with NumPy and the U-Net alone
    (DDIM, eta 1, guidance 1, the base picture: no decoder): byte-identical."""
    sch = gen.schedule
    n, strength, seed = 8, 0.6, 12
    ts = np.round(np.linspace(sch.timesteps, 0, n + 1))[:-1].astype(int)
    k = n - min(int(n * strength), n)
    big = picture.astype(np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1)
    x0 = big.reshape(3, 16, 4, 16, 4).mean(axis=(2, 4), dtype=np.float32)[None]
    keep = ~left_half.reshape(16, 4, 16, 4).any(axis=(1, 3))
    ab = sch.alpha_bar64
    f = np.float32
    noise = ImageNoise(seed, [0])
    x = noise.standard_normal((1, 3, 16, 16))
    x = (f(np.sqrt(ab[ts[k]])) * x0 + f(np.sqrt(1 - ab[ts[k]])) * x).astype(f)
    c = gen.context("a blue car")[None]
    for i in range(k, n):
        t, p = ts[i], (ts[i + 1] if i + 1 < n else 0)
        eps = gen.eps(x, t, c)
        x0_hat = (x - f(np.sqrt(1 - ab[t])) * eps) * f(1 / np.sqrt(ab[t]))
        sigma = np.sqrt((1 - ab[p]) / (1 - ab[t])) * np.sqrt(1 - ab[t] / ab[p])
        x = f(np.sqrt(ab[p])) * x0_hat + f(np.sqrt(max(0, 1 - ab[p] - sigma**2))) * eps
        if sigma > 0:
            x = x + f(sigma) * noise.standard_normal(x.shape)
        known = x0
        if p > 0:
            z = noise.standard_normal(x.shape)
            known = (f(np.sqrt(ab[p])) * x0 + f(np.sqrt(1 - ab[p])) * z).astype(f)
        x = np.where(keep, known, x)
    want = to_uint8(x)
    got = gen.generate(
        "a blue car", seed=seed, sampler="ddim", steps=n, eta=1.0, guidance=1.0,
        init_image=picture, mask=left_half, strength=strength, size=16,
    )  # fmt: skip
    kept = np.broadcast_to(keep[..., None], want.shape)  # the output's kept pixels: the input's
    assert np.array_equal(got[~kept], want[~kept])
    assert np.abs(got.astype(int) - want).max() <= 1  # the kept region: x0's rounding


def test_pictures_are_read_as_documented(gen, tmp_path):
    """Any size, resized; transparency on white; an animated PNG's first frame; the mask's
    threshold at 128 and transparency as black (kept)."""
    from ddpm_rt.images import MASK_THRESHOLD, load_mask, load_picture

    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200  # red where opaque
    rgba[5:, :, 3] = 255
    got = load_picture(rgba, 10, 10)  # its own size: not resampled
    assert (got[0, 0] == 255).all() and tuple(got[9, 9]) == (200, 0, 0)
    assert load_picture(rgba, 4, 6).shape == (4, 6, 3)
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "anim.png").n_frames == 2
    assert tuple(load_picture(tmp_path / "anim.png", 4, 4)[0, 0]) == (0, 0, 255)
    grey = np.array([[MASK_THRESHOLD - 1, MASK_THRESHOLD]], np.uint8)
    assert load_mask(grey, 1, 2).tolist() == [[False, True]]
    la = np.zeros((2, 2, 4), np.uint8)
    la[..., :3] = 255  # white but transparent: kept
    assert not load_mask(la, 2, 2).any()


BAD = [
    ("mask without a picture", {"mask": np.ones((4, 4), bool)}, "mask", "a mask needs an init"),
    ("strength without", {"strength": 0.5}, "strength", "strength needs an init image"),
    ("resample without a mask", {"init_image": "P", "resample": 2}, "resample", "needs a mask"),
    ("strength over 1", {"init_image": "P", "strength": 1.5}, "strength", "between 0 and 1"),
    ("NaN", {"init_image": np.full((4, 4, 3), np.nan)}, "init_image", "NaN or Inf"),
    ("float over 1", {"init_image": np.full((4, 4, 3), 2.0)}, "init_image", "in [0, 1]"),
    ("bad shape", {"init_image": np.zeros((4, 4, 2), np.uint8)}, "init_image", "(H, W, 3)"),
    ("not a file", {"init_image": "/nonexistent.png"}, "init_image", "cannot read"),
    ("a number", {"init_image": 5}, "init_image", "file path or a NumPy array"),
]


@pytest.mark.parametrize("kw,field,text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_refusals_are_one_line_errors_before_any_work(gen, picture, kw, field, text):
    kw = {k: picture if isinstance(v, str) and v == "P" else v for k, v in kw.items()}
    calls = []
    with pytest.raises(InputError) as e:
        gen.generate("a cat", callback=lambda info: calls.append(info), **kw)
    assert e.value.field == field and text in str(e.value) and "\n" not in str(e.value)
    assert calls == []  # no step ran


def test_a_file_that_is_not_a_picture_is_refused(gen, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_text("not a picture")
    with pytest.raises(InputError, match="not a readable PNG, JPEG or WebP picture"):
        gen.generate("a cat", init_image=bad)


@pytest.mark.slow
def test_a_latent_bundle_without_an_encoder_refuses_a_picture(latent_trained):
    g = Generator(latent_trained["bundle"])
    with pytest.raises(InputError, match="needs an encoder graph") as e:
        g.generate("red circle", init_image=np.zeros((8, 8, 3), np.uint8), steps=2)
    assert e.value.field == "init_image"


def test_cli_init_image_and_mask_with_provenance(gen, picture, left_half, tmp_path):
    Image.fromarray(picture).save(tmp_path / "in.png")
    Image.fromarray(left_half.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = ["--prompt", "a blue car", "--seed", "2", "--num", "2", "--strength", "0.7"]
    args += ["--init-image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")]
    cli = [sys.executable, "-m", "ddpm_rt.cli"]
    proc = subprocess.run([*cli, *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    want = gen.generate("a blue car", seed=2, num=2, strength=0.7, init_image=picture,
                        mask=left_half)  # fmt: skip
    grid = np.asarray(Image.open(out))
    assert np.array_equal(grid[1:65, 1:65], want[0])
    info = subprocess.run([*cli, "info", str(out)], capture_output=True, text=True, timeout=120)
    rec = json.loads(info.stdout)
    import hashlib

    assert rec["strength"] == 0.7 and rec["resample"] == 0
    assert rec["init_image_sha256"] == hashlib.sha256(picture.tobytes()).hexdigest()
    assert rec["mask_sha256"] == hashlib.sha256(left_half.astype(np.uint8).tobytes()).hexdigest()
    bad = subprocess.run([*cli, "--prompt", "x", "--mask", str(tmp_path / "mask.png"), "--out",
                          str(tmp_path / "b.png")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "error: a mask needs an init image (the picture it masks)"
    )  # fmt: skip
    assert not (tmp_path / "b.png").exists()


def test_strength_one_batches_with_text_to_image_and_each_is_as_alone(gen, picture):
    """Review finding: a strength-1 job (its picture unused) and a text-to-image job share
    a batch key; run together they must not fail, and each is as it is alone."""
    kw = {"sampler": "ddim", "steps": 4, "seed": 2}
    a = gen.prepare("red apple", init_image=picture, strength=1.0, **kw)
    b = gen.prepare("a cat", **kw)
    assert a.batch_key == b.batch_key
    gen.run_jobs([a, b])
    assert a.error is None and b.error is None
    assert np.array_equal(a.images, gen.generate("red apple", **kw))
    assert np.array_equal(b.images, gen.generate("a cat", **kw))
    assert a.inputs["init_image_sha256"]  # still recorded


def test_sample_loop_at_strength_zero_returns_the_picture(gen):
    from ddpm_rt.core.samplers import make_sampler, sample_loop

    s = make_sampler("ddim", gen.schedule, 4)
    init = np.full((1, 3, 4, 4), 0.25, np.float32)
    got = sample_loop(lambda x, t: x, s, init.shape, ImageNoise(0, [0]), start=4, init=init)
    assert np.array_equal(got, init)


def test_pictures_upright_16_bit_and_colour_key(tmp_path):
    """EXIF orientation applied; 16-bit grey scaled (not clipped); a colour key (tRNS) is
    transparency."""
    from ddpm_rt.images import load_mask, load_picture

    im = Image.new("RGB", (8, 4), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 4, 4))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    im.save(tmp_path / "o.jpg", exif=exif, quality=100)
    up = load_picture(tmp_path / "o.jpg", 8, 4)  # seen upright: 4 wide, 8 tall
    assert up[1, 2, 0] > 200 and up[6, 2, 0] < 60  # red on top after the rotation
    grey16 = np.array([[0, 65535]], np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert load_picture(tmp_path / "g16.png", 1, 2)[0, :, 0].tolist() == [0, 255]
    assert load_mask(tmp_path / "g16.png", 1, 2).tolist() == [[False, True]]
    key = Image.new("RGB", (2, 1), (10, 20, 30))
    key.putpixel((1, 0), (255, 0, 0))
    key.save(tmp_path / "key.png", transparency=(255, 0, 0))
    assert load_picture(tmp_path / "key.png", 1, 2)[0, 1].tolist() == [255, 255, 255]


def test_server_counts_resample_against_its_step_limit():
    from ddpm_rt.tools.serve.api import Limits, RequestError, check_calls

    check_calls(10, 4, Limits(max_steps=50))  # 50 calls: allowed
    with pytest.raises(RequestError) as e:
        check_calls(10, 5, Limits(max_steps=50))
    assert e.value.param == "resample" and "60 U-Net calls" in e.value.message


def test_cli_refuses_a_trajectory_at_strength_zero_before_any_work(picture, tmp_path):
    Image.fromarray(picture).save(tmp_path / "in.png")
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_rt.cli", "--prompt", "x", "--init-image",
         str(tmp_path / "in.png"), "--strength", "0", "--trajectory", str(tmp_path / "t.gif"),
         "--out", str(tmp_path / "o.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --trajectory needs a sampling step; strength 0 takes none"
    assert not (tmp_path / "o.png").exists()
