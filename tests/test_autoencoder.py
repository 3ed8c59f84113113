"""The latent autoencoder (issue 19): shapes, decoder cost, training, resume, the scale
factor, held-out PSNR, encode-latents, and the U-Net (one and two processes) on latents.

Tiny configurations (32x32 images -> 8x8x4 latents, width 8) so that every test takes seconds."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddpm_rt.images import make_grid
from ddpm_rt.training.autoencoder import (
    MAX_DECODER_GFLOP,
    AutoencoderConfig,
    build_autoencoder,
    check_decoder_cost,
    decoder_gflop,
    load_autoencoder,
    psnr,
)
from ddpm_rt.training.autoencoder_train import AETrainConfig, AETrainer, train_autoencoder
from ddpm_rt.training.shapes_dataset import make_shapes

from conftest import run_cli

TINY = {"latent_channels": 4, "encoder_width": 8, "decoder_width": 8}


@pytest.fixture(scope="module")
def styled_npz(tmp_path_factory):
    """48 labelled 32x32 images in three 'styles'; style c is the held-out one."""
    d = make_shapes(48, size=32, seed=5)
    d["styles"] = np.array(["a", "b", "c"] * 16)
    path = tmp_path_factory.mktemp("ae_data") / "styled.npz"
    np.savez(path, **d)
    return path


def _cfg(data, out, **kw):
    base = dict(steps=4, batch_size=8, holdout_style="c", checkpoint_every=2, device="cpu")
    return AETrainConfig(data=str(data), out=str(out), **{**base, **TINY, **kw})


@pytest.fixture(scope="module")
def trained_ae(styled_npz, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ae") / "ae"
    summary = train_autoencoder(_cfg(styled_npz, out), progress=False)
    return out, summary


def test_shapes_64_to_16():
    """The default autoencoder maps 64x64x3 to 16x16xC and back."""
    for c in (4, 8):
        cfg = AutoencoderConfig(latent_channels=c)
        assert (cfg.downscale, cfg.latent_size) == (4, 16)
        model = build_autoencoder(cfg).eval()
        with torch.no_grad():
            z = model.encode(torch.zeros(2, 3, 64, 64)).latents
            x = model.decode(z).sample
        assert z.shape == (2, c, 16, 16)
        assert x.shape == (2, 3, 64, 64)


def test_decoder_cost_is_counted_and_capped():
    # The default decoder: 48 channels; its biggest layers are the three 3x3 48->48 convs of
    # the last level at 64x64 (2 * 48 * 48 * 9 * 4096 FLOPs each) -- a floor for the count.
    gflop = decoder_gflop(AutoencoderConfig())
    assert 3 * 2 * 48 * 48 * 9 * 64 * 64 / 1e9 < gflop <= MAX_DECODER_GFLOP
    assert check_decoder_cost(AutoencoderConfig()) == gflop
    with pytest.raises(Exception, match="GFLOP per 64x64 image"):
        check_decoder_cost(AutoencoderConfig(decoder_width=80))


def test_builds_without_the_network(tmp_path):
    """diffusers' AutoencoderTiny is built from code alone: nothing is downloaded."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from ddpm_rt.training.autoencoder import AutoencoderConfig, build_autoencoder\n"
        "build_autoencoder(AutoencoderConfig())\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_training_checkpoint_and_scale_factor(trained_ae, styled_npz):
    out, summary = trained_ae
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 4 and summary["steps"] == 4
    assert meta["latent"] == {
        "channels": 4,
        "height": 8,
        "width": 8,
        "image_size": 32,
        "scale_factor": meta["latent"]["scale_factor"],
        "shift": meta["latent"]["shift"],
        "mean": meta["latent"]["mean"],
        "channel_std": meta["latent"]["channel_std"],
    }
    # The shift is the per-channel mean and the scale factor 1 / std of the shifted latents
    # over every image, recomputed here from the images and the weights on disk.
    model, _ = load_autoencoder(out)
    images = np.load(styled_npz)["images"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = model.encode(x).latents
    mean = z.double().mean(dim=(0, 2, 3))
    assert meta["latent"]["shift"] == pytest.approx(mean.tolist())
    shifted = z.double() - mean.reshape(1, -1, 1, 1)
    assert meta["latent"]["scale_factor"] == pytest.approx(1 / shifted.std(unbiased=False))
    assert meta["latent"]["channel_std"] == pytest.approx(
        z.double().std(dim=(0, 2, 3), unbiased=False).tolist()
    )
    # Held-out PSNR: style c only, never trained on; recomputed independently in NumPy.
    held = images[2::3]
    with torch.no_grad():
        y = model.decode(model.encode(x[2::3]).latents).sample.clamp(-1, 1).numpy()
    mse = (((y.transpose(0, 2, 3, 1) + 1) / 2 - held / 255.0) ** 2).mean(axis=(1, 2, 3))
    assert meta["psnr_heldout"] == pytest.approx(np.mean(-10 * np.log10(mse)), abs=1e-3)
    # A logged loss every 10 steps and at the end, PSNR at each checkpoint.
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [4]
    assert [x["step"] for x in lines if "psnr_heldout" in x] == [2, 4]
    # A grid at each checkpoint: 8 held-out images over their reconstructions, at x2.
    h, w = make_grid(np.zeros((16, 32, 32, 3), np.uint8), 8).shape[:2]
    for step in (2, 4):
        with Image.open(out / "samples" / f"recon_{step:07d}.png") as im:
            assert im.size == (2 * w, 2 * h)


def test_psnr_clamps_to_the_pixel_range(styled_npz):
    """Reconstructions are clamped to [-1, 1] before PSNR, as the runtime writes pixels."""
    model = build_autoencoder(AutoencoderConfig(image_size=32, **TINY)).eval()
    last = model.decoder.layers[-1]  # the output conv; DecoderTiny returns 2 * out - 1
    with torch.no_grad():
        last.weight.zero_(), last.bias.fill_(1.5)  # every pixel 2.0: clamped to 1 (white)
    images = np.load(styled_npz)["images"][:6]
    mse = ((1.0 - images / 255.0) ** 2).mean(axis=(1, 2, 3))
    assert psnr(model, images) == pytest.approx(np.mean(-10 * np.log10(mse)), abs=1e-4)


def test_heldout_style_is_not_trained_on(styled_npz, tmp_path):
    trainer = AETrainer(_cfg(styled_npz, tmp_path / "x"))
    assert len(trainer.train_images) == 32 and len(trainer.heldout) == 16
    styles = np.load(styled_npz)["styles"]
    trained_rows = {r.tobytes() for r in np.load(styled_npz)["images"][styles != "c"]}
    assert all(r.tobytes() in trained_rows for r in trainer.train_images)


def test_resume_continues_exactly(styled_npz, tmp_path, trained_ae):
    torch.set_num_threads(1)
    # A 4-step run interrupted after its step-2 checkpoint, then resumed.
    first = AETrainer(_cfg(styled_npz, tmp_path / "r"))
    first.train_step(), first.train_step()
    first.save()
    train_autoencoder(_cfg(styled_npz, tmp_path / "r", steps=None), resume=True, progress=False)
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(trained_ae[0] / name), load_file(tmp_path / "r" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")
    meta = json.loads((tmp_path / "r" / "config.json").read_text())
    assert meta["step"] == 4 and meta["train"]["steps"] == 4


def test_cli_refuses_bad_input_before_work(styled_npz, tmp_path):
    base = ["train-autoencoder", "--data", str(styled_npz), "--holdout-style", "c"]
    base += ["--steps", "2", "--no-progress"]  # a run that is not refused ends soon
    cases = [
        (["--out", str(tmp_path / "a"), "--holdout-style", "zz"], "no images of style 'zz'"),
        (["--out", str(tmp_path / "b"), "--decoder-width", "80"], "GFLOP per 64x64 image"),
        (["--out", str(tmp_path / "c"), "--resume"], "nothing to resume"),
        (["--out", str(tmp_path / "d"), "--steps", "0"], "steps must be >= 1"),
    ]
    for extra, msg in cases:
        proc = run_cli(*base, *extra, check=False)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], lines
        assert not any(tmp_path.iterdir()), "a refused run wrote files"


def test_latent_unet_trains_and_runs_distributed(trained_ae, styled_npz, tmp_path):
    from test_ddp import _torchrun

    ae_dir = trained_ae[0]
    lat = tmp_path / "lat.npz"
    run_cli("encode-latents", str(ae_dir), "--data", str(styled_npz), "--out", str(lat))
    with np.load(lat) as z:
        latents, info = z["latents"], json.loads(str(z["latent"]))
        assert "images" not in z.files and z["labels"].shape == (48,)
    assert latents.shape == (48, 4, 8, 8) and latents.dtype == np.float32
    assert latents.std() == pytest.approx(1.0, rel=1e-4)  # unit variance after scaling
    assert np.abs(latents.mean(axis=(0, 2, 3))).max() < 1e-4  # zero mean per channel
    meta = json.loads((ae_dir / "config.json").read_text())
    assert info["scale_factor"] == meta["latent"]["scale_factor"]
    # One process: the U-Net takes C channels in and out; the grid is decoded to pixels.
    args = ["--steps", "3", "--batch-size", "8", "--n-feat", "8", "--timesteps", "20"]
    run_cli("train", "--data", str(lat), "--out", str(tmp_path / "u"), *args, "--no-progress")
    ck = json.loads((tmp_path / "u" / "config.json").read_text())
    assert (ck["unet"]["in_channels"], ck["unet"]["height"]) == (4, 8)
    assert ck["latent"]["autoencoder"]["path"] == str(ae_dir.resolve())
    with Image.open(tmp_path / "u" / "samples" / "step_0000003.png") as im:
        # 8 rows x 4 columns of 32x32 *pixel* images (not 8x8 latents), shown at x2
        h, w = make_grid(np.zeros((32, 32, 32, 3), np.uint8), 4).shape[:2]
        assert im.size == (2 * w, 2 * h)
    # It exports as a latent bundle (tests/test_latent_bundle.py covers those).
    run_cli("export", str(tmp_path / "u"), "--out", str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["requires"] == ["latent"]
    # Two processes on the same latent data stay in sync.
    proc = _torchrun(lat, tmp_path / "ddp", 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes, ranks in sync" in proc.stderr
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["unet"]["in_channels"] == 4
