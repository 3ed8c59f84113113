"""The cascade (issue 27): the projection that keeps the base picture, the upscaler's
training (augmentation, cost cap, bit-exact resume), the cascade bundle (``latent.kind:
"pixels"``) and ``--size`` in the Python API and the CLI.

Tiny shapes: a crafted 8x8 base bundle and a width-8 upscaler trained a few steps on
32x32 pictures, so every test takes seconds."""

import json

import numpy as np
import pytest
import torch
from craft import read_manifest, write_bundle, write_manifest
from safetensors.torch import load_file

from ddpm_rt import Bundle, Generator
from ddpm_rt.errors import BundleError, InputError
from ddpm_rt.training.shapes_dataset import make_shapes
from ddpm_rt.training.upscaler import (
    MAX_UPSCALER_GFLOP,
    ExportedUpscaler,
    Upscaler,
    UpscalerConfig,
    box_down,
    check_upscaler_cost,
    project,
    upscaler_gflop,
)
from ddpm_rt.training.upscaler_train import (
    UpscalerTrainConfig,
    UpscalerTrainer,
    augment,
    train_upscaler,
)

from conftest import run_cli

TINY = {"width": 8, "blocks": (1, 1, 1)}


def test_projection_makes_the_box_average_exactly_the_input():
    g = torch.Generator().manual_seed(0)
    sr = torch.randn(3, 3, 32, 32, generator=g)
    low = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    out = project(sr, low, 4)
    torch.testing.assert_close(box_down(out, 4), low, rtol=0, atol=1e-6)
    # and the network's output is projected: whatever its weights
    model = Upscaler(UpscalerConfig(low_size=8, **TINY))
    y = model(low, torch.zeros(3))
    torch.testing.assert_close(box_down(y, 4), low, rtol=0, atol=1e-6)


def test_the_exported_decoder_keeps_the_input_average_after_clamping():
    """Near the range's ends the clamp moves block averages; fit_in_range brings them back
    exactly (to float rounding) without leaving [-1, 1]."""
    torch.manual_seed(0)
    model = Upscaler(UpscalerConfig(low_size=8, **TINY))
    with torch.no_grad():  # a network that pushes far past the range
        model.body.layers[-1].weight.mul_(50)
    low = torch.rand(4, 3, 8, 8) * 2 - 1
    low[:, :, :4] = 1.0  # saturated blocks
    out = ExportedUpscaler(model, 0.0)(low)
    assert out.abs().max() <= 1.0
    assert (box_down(out, 4) - low).abs().max() < 1e-5


def test_cost_cap_is_counted_and_enforced():
    gflop = upscaler_gflop(UpscalerConfig())
    # the three 3x3 convs of a width-48 block at 64x64 alone: 2 * 48 * 48 * 9 * 4096 * 3
    assert 2 * 48 * 48 * 9 * 64 * 64 * 3 / 1e9 < gflop <= MAX_UPSCALER_GFLOP
    with pytest.raises(InputError, match="GFLOP per 64x64 image"):
        check_upscaler_cost(UpscalerConfig(width=96))


def test_augmentation_is_seeded_and_bounded():
    cfg = UpscalerTrainConfig(data="", out="", max_aug=0.2, max_blur=1.0)
    low = torch.rand(16, 3, 8, 8) * 2 - 1
    a, la = augment(low, cfg, torch.Generator().manual_seed(3))
    b, lb = augment(low, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert 0 <= la.min() and la.max() <= 0.2 and not torch.equal(a, low)
    zero = UpscalerTrainConfig(data="", out="", max_aug=0.0, max_blur=0.0)
    c, lc = augment(low, zero, torch.Generator().manual_seed(3))
    torch.testing.assert_close(c, low) and torch.testing.assert_close(lc, torch.zeros(16))


@pytest.fixture(scope="module")
def data32(tmp_path_factory):
    d = make_shapes(48, size=32, seed=5)
    d["styles"] = np.array(["a", "b", "c"] * 16)
    path = tmp_path_factory.mktemp("up_data") / "styled.npz"
    np.savez(path, **d)
    return path


def _cfg(data, out, **kw):
    base = dict(steps=4, batch_size=8, holdout_style="c", checkpoint_every=2, device="cpu")
    return UpscalerTrainConfig(data=str(data), out=str(out), **{**base, **TINY, **kw})


@pytest.fixture(scope="module")
def trained(data32, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("up") / "up"
    summary = train_upscaler(_cfg(data32, out), progress=False)
    return out, summary


def test_training_logs_held_out_psnr_against_bicubic(trained):
    out, s = trained
    assert s["steps"] == 4 and s["gflop"] > 0
    assert np.isfinite(s["psnr_heldout"]) and np.isfinite(s["psnr_bicubic"])
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "ddpm-rt-upscaler" and meta["upscaler"]["low_size"] == 8
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 4]  # a checkpoint (held-out figures) at 2; loss and checkpoint at 4


def test_resume_continues_bit_for_bit(data32, tmp_path, trained):
    torch.set_num_threads(1)
    first = UpscalerTrainer(_cfg(data32, tmp_path / "r"))
    first.train_step(), first.train_step()
    first.save()
    train_upscaler(_cfg(data32, tmp_path / "r", steps=None), resume=True, progress=False)
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(trained[0] / name), load_file(tmp_path / "r" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")


def test_cli_refuses_bad_input_before_work(data32, tmp_path):
    base = ["train-upscaler", "--data", str(data32), "--holdout-style", "c", "--steps", "2"]
    base += ["--no-progress", "--width", "8"]
    cases = [
        (["--out", str(tmp_path / "a"), "--width", "300"], "width must be in [4, 256]"),
        (["--out", str(tmp_path / "b"), "--blocks", "1"], "at least 2 levels"),
        (["--out", str(tmp_path / "c"), "--resume"], "nothing to resume"),
        (["--out", str(tmp_path / "d"), "--max-aug", "nan"], "max-aug must be in [0, 10]"),
        (["--out", str(tmp_path / "e"), "--blocks", "1,1,1,1,1"], "needs a multiple of 64"),
    ]
    for extra, msg in cases:
        proc = run_cli(*base, *extra, check=False)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], lines
    assert not any(tmp_path.iterdir())


# -- the cascade bundle ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cascade(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    base = write_bundle(root / "base")
    proc = run_cli("cascade", str(base), str(trained[0]), "--out", str(root / "c"))
    assert "wrote" in proc.stderr
    return base, root / "c"


def test_cascade_bundle_says_what_it_is(cascade):
    base, c = cascade
    b = Bundle.load(c, hash_all=True)
    assert b.image_shape == (3, 32, 32) and b.base_shape == (3, 8, 8) and b.sizes == (32, 8)
    assert b.latent["kind"] == "pixels" and "latent" in b.manifest["requires"]
    for name, entry in Bundle.load(base).manifest["files"].items():  # copied byte for byte
        assert b.manifest["files"][name] == entry
    info = run_cli("info", str(c)).stdout
    assert "cascade     the U-Net draws 3x8x8 pictures" in info and "sizes 32, 8" in info


def test_the_base_picture_is_one_setting_away_and_the_big_one_averages_to_it(cascade):
    base, c = cascade
    small = Generator(Bundle.load(base)).generate(["thing 1", "thing 2"], num=3, seed=4)
    gen = Generator(Bundle.load(c))
    same = gen.generate(["thing 1", "thing 2"], num=3, seed=4, size=8)
    assert np.array_equal(same, small)  # the U-Net's own picture, no decoder
    big = gen.generate(["thing 1", "thing 2"], num=3, seed=4)
    assert big.shape == (6, 32, 32, 3)
    avg = big.astype(np.float64).reshape(6, 8, 4, 8, 4, 3).mean(axis=(2, 4))
    diff = np.abs(avg - small)
    assert diff.mean() <= 0.5 and diff.max() <= 2.0, (diff.mean(), diff.max())
    assert np.array_equal(gen.generate("thing 1", num=1, size=32), gen.generate("thing 1"))
    with pytest.raises(
        InputError, match=r"size 16 is not one this model gives \(choose from: 32, 8\)"
    ):
        gen.generate("thing 1", size=16)


def test_cli_size_flag_and_provenance(cascade, tmp_path):
    _, c = cascade
    run_cli(
        "--model", str(c), "--prompt", "thing 1", "--num", "2", "--out", str(tmp_path / "a.png")
    )
    run_cli(
        "--model",
        str(c),
        "--prompt",
        "thing 1",
        "--num",
        "2",
        "--size",
        "8",
        "--out",
        str(tmp_path / "b.png"),
    )
    from PIL import Image

    # two pictures in a row with the grid's 1-pixel borders
    assert Image.open(tmp_path / "a.png").size == (2 * 32 + 3, 32 + 2)
    assert Image.open(tmp_path / "b.png").size == (2 * 8 + 3, 8 + 2)
    prov = json.loads(run_cli("info", str(tmp_path / "b.png")).stdout)
    assert prov["size"] == 8 and "decoder" not in prov
    assert "size" not in json.loads(run_cli("info", str(tmp_path / "a.png")).stdout)
    proc = run_cli(
        "--model",
        str(c),
        "--prompt",
        "x",
        "--size",
        "12",
        "--out",
        str(tmp_path / "c.png"),
        check=False,
    )
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: size 12 is not one this model gives (choose from: 32, 8)"
    ]
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda lat: lat.update(kind="voxels"), "latent.kind"),
        (lambda lat: lat.update(scale_factor=2.0), "scale_factor 1 and shift 0"),
        (lambda lat: lat.update(shift=[0.1, 0.0, 0.0]), "scale_factor 1 and shift 0"),
    ],
    ids=["unknown-kind", "scaled", "shifted"],
)
def test_a_pixels_latent_that_is_not_the_picture_is_refused(cascade, tmp_path, change, message):
    import shutil

    _, c = cascade
    bad = tmp_path / "bad"
    shutil.copytree(c, bad)
    m = read_manifest(bad)
    change(m["latent"])
    write_manifest(bad, m)
    with pytest.raises(BundleError, match=message):
        Bundle.load(bad)


def test_cascade_refuses_what_it_cannot_build(cascade, trained, tmp_path):
    base, c = cascade
    for args, msg in [
        ((str(c), str(trained[0]), "--out", str(tmp_path / "a")), "already a latent bundle"),
        ((str(base), str(trained[0]), "--out", str(c)), "exists; pass --force"),
        ((str(base), str(tmp_path), "--out", str(tmp_path / "b")), "no upscaler checkpoint"),
    ]:
        proc = run_cli("cascade", *args, check=False)
        assert proc.returncode == 1, proc.stderr
        assert msg in proc.stderr.strip().splitlines()[-1]


def test_server_gives_either_size(cascade):
    pytest.importorskip("starlette", reason="pip install 'ddpm-rt[serve]'")
    import base64
    import io

    from PIL import Image
    from starlette.testclient import TestClient

    from ddpm_rt.tools.serve import create_app

    _, c = cascade
    gen = Generator(Bundle.load(c))
    with TestClient(create_app(gen)) as client:
        assert client.get("/api/info").json()["sizes"] == [32, 8]
        r = client.post("/api/generate", json={"prompt": "thing 1", "seed": 2, "size": 8})
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
        assert np.array_equal(got, gen.generate("thing 1", seed=2, size=8)[0])
        bad = client.post("/api/generate", json={"prompt": "thing 1", "size": 12})
        assert bad.status_code == 422 and "size 12 is not one this model gives" in bad.text
        r = client.post("/v1/images/generations", json={"prompt": "thing 1", "size": "8x8"})
        assert r.status_code == 200, r.text
        png = base64.b64decode(r.json()["data"][0]["b64_json"])
        assert Image.open(io.BytesIO(png)).size == (8, 8)
        bad = client.post("/v1/images/generations", json={"prompt": "x", "size": "16x16"})
        assert bad.status_code == 422 and "size must be 32x32 or 8x8" in bad.text
