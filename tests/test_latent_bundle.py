"""Latent bundles (issue 19): the U-Net samples a latent and the bundle's decoder graph turns
it into the image. Export, manifest contract, the decoder in the generation path (final
images, previews, --trajectory, provenance), and its failure modes.

Uses the ``latent_trained`` fixture: a real but barely trained 32x32 model (8x8x4 latents)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from craft import decoder_graph, read_manifest, rehash, write_manifest
from PIL import Image

from ddpm_rt import Bundle, Generator
from ddpm_rt.bundle import manifest as manifest_mod
from ddpm_rt.bundle.io_spec import decoder_io, unet_io
from ddpm_rt.bundle.manifest import validate_manifest
from ddpm_rt.core.samplers import to_uint8
from ddpm_rt.errors import BackendError, BundleError, InputError, NumericalError

from conftest import run_cli

GEN = {"sampler": "ddim", "steps": 4, "seed": 3, "guidance": 2.0}


@pytest.fixture
def bundle_copy(latent_trained, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(latent_trained["bundle"], dst)
    return dst


def test_export_writes_the_latent_object_and_the_decoder_graph(latent_trained):
    b = Bundle.load(latent_trained["bundle"])  # every file hashed, every spec checked
    m = b.manifest
    assert m["requires"] == ["latent"]
    assert b.image_shape == (3, 32, 32) and b.sample_shape == (4, 8, 8)
    assert b.decoder_precisions == {"fp32": "decoder"}
    assert b.graphs["decoder"] == decoder_io(4, 8, 8, 32, 32)
    assert b.graphs["unet"].mismatch(unet_io(4, 8, 8, b.context_dim)) is None
    # what the diffusion model was trained on: the autoencoder's shift and scale
    ae = json.loads((latent_trained["ae"] / "config.json").read_text())["latent"]
    assert m["latent"]["scale_factor"] == ae["scale_factor"]
    assert m["latent"]["shift"] == ae["shift"]
    assert [p["ok"] for p in m["parity"]["decoder"]] == [True, True]
    assert "parity decoder batch 8" in latent_trained["export_log"]


def _decoder_module(latent_trained):
    """The torch reference: the autoencoder's decoder after x / scale_factor + shift."""
    from ddpm_rt.training.autoencoder import decode, load_autoencoder

    model, meta = load_autoencoder(latent_trained["ae"])
    info = meta["latent"]
    shift = torch.tensor(info["shift"]).reshape(1, -1, 1, 1)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = torch.from_numpy(x) / info["scale_factor"] + shift
            return decode(model, z).clamp(-1, 1).numpy()

    return run


def test_images_are_the_sampled_latents_decoded(latent_trained):
    """The final latent goes through the decoder graph, which is the autoencoder's decoder
    with the latent's un-scaling folded in (checked against torch)."""
    gen = Generator(latent_trained["bundle"])
    seen = []
    to_pixels = gen.to_pixels
    gen.to_pixels = lambda x: seen.append(x.copy()) or to_pixels(x)
    images = gen.generate("a small red circle", num=3, **GEN)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    (latent,) = seen
    assert latent.shape == (3, 4, 8, 8)
    want = to_uint8(_decoder_module(latent_trained)(latent))
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
    # not the latent drawn as pixels, nor a constant image
    assert images.std() > 1


def test_previews_and_trajectory_are_decoded(latent_trained, tmp_path):
    gen = Generator(latent_trained["bundle"])
    previews = []
    gen.generate(
        "a large blue square", num=2, callback=lambda i: previews.append(i.preview),
        preview_every=1, **GEN,
    )  # fmt: skip
    assert len(previews) == 4 and all(p.shape == (2, 32, 32, 3) for p in previews)
    out, gif = tmp_path / "a.png", tmp_path / "a.gif"
    run_cli(
        "--model", str(latent_trained["bundle"]), "--prompt", "a small red circle",
        "--num", "2", "--steps", "4", "--sampler", "ddim", "--out", str(out),
        "--trajectory", str(gif), "--scale", "1",
    )  # fmt: skip
    with Image.open(out) as png, Image.open(gif) as frames:
        assert png.size == frames.size  # both grids of 32x32 images, not 8x8 latents
        assert png.size[1] == 32 + 2  # one row with a one-pixel border
        assert frames.n_frames == 4
    info = json.loads(run_cli("info", str(out)).stdout)
    assert (info["decoder"], info["decoder_precision"]) == ("decoder", "fp32")


def test_an_older_runtime_refuses_the_bundle_by_name(latent_trained, monkeypatch):
    monkeypatch.setattr(manifest_mod, "KNOWN_FEATURES", frozenset())
    with pytest.raises(BundleError, match=r"requires feature.*latent.*upgrade ddpm-rt"):
        Bundle.load(latent_trained["bundle"])


def _edit(m, path, value):
    *keys, last = path.split(".")
    for k in keys:
        m = m[int(k)] if isinstance(m, list) else m[k]
    if value is None:
        del m[last]
    else:
        m[int(last) if isinstance(m, list) else last] = value


@pytest.mark.parametrize(
    "path, value, why",
    [
        ("requires", [], "requires: a bundle with a 'latent' object must list 'latent'"),
        ("latent", None, "latent: missing"),
        ("latent.channels", 3, "latent.shift: must be a list of 3 finite numbers"),
        ("latent.height", 16, "latent: 16x8 must divide the image 32x32 by one whole factor"),
        ("latent.height", 6, "latent: height and width must be divisible by 4"),
        ("latent.scale_factor", 0, "latent.scale_factor: must be a number in"),
        ("latent.shift", [0.0, 1.0], "latent.shift: must be a list of 4 finite numbers"),
        ("latent.decoder.graphs", {"int4": "decoder"}, "'int4' is not one of fp32, fp16, int8"),
        ("latent.decoder.graphs", {"fp32": "unet"}, "graphs.unet: has inputs .* latent decoder"),
        ("latent.decoder.default_precision", "fp16", "must be one of fp32"),
        ("image.height", 64, "latent: 8x8 must divide the image 64x32"),
        ("graphs.decoder.outputs.0.shape", ["batch", 3, 16, 16], "graphs.decoder: output"),
    ],
)
def test_manifest_contract(latent_trained, path, value, why):
    m = read_manifest(latent_trained["bundle"])
    validate_manifest(m)
    _edit(m, path, value)
    with pytest.raises(BundleError, match="invalid manifest: .*" + why):
        validate_manifest(m)


def test_the_unet_spec_comes_from_the_latent(latent_trained):
    """A U-Net graph declared at the image's shape is refused for a latent bundle; so is a
    latent whose channels disagree with the U-Net."""
    m = read_manifest(latent_trained["bundle"])
    m["latent"]["channels"] = 3
    del m["latent"]["shift"]
    with pytest.raises(BundleError, match=r"graphs.unet: input 'x' has shape .* latent and"):
        validate_manifest(m)
    m = read_manifest(latent_trained["bundle"])
    m["graphs"]["unet"]["inputs"][0]["shape"] = ["batch", 3, 32, 32]
    with pytest.raises(BundleError, match=r"graphs.unet: input 'x' has shape .* latent and"):
        validate_manifest(m)


def test_decoder_precision_is_checked(latent_trained, trained, tmp_path):
    with pytest.raises(InputError, match="decoder comes in fp32, not 'int8'"):
        Generator(latent_trained["bundle"], decoder_precision="int8")
    with pytest.raises(InputError, match="decoder precision applies to latent bundles only"):
        Generator(trained["bundle"], decoder_precision="fp32")
    proc = run_cli(
        "--model", str(trained["bundle"]), "--prompt", "", "--decoder-precision", "fp32",
        "--out", str(tmp_path / "x.png"), check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "decoder precision applies to latent bundles only" in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("bad", "shown"), [(np.nan, "NaN"), (-1e30, "1e[+]30"), (1e30, "1e[+]30"), (np.inf, "Inf")]
)
def test_a_decoder_output_beyond_its_contract_is_an_error(bundle_copy, tmp_path, bad, shown):
    """Pixels in [-1, 1] is the decoder's contract: -1e30 (+1e30) was written as an all-black
    (all-white) PNG with exit 0 before (issue 25), NaN was already refused. Now each is an
    error naming the graph, and no file is written."""
    (bundle_copy / "decoder.onnx").write_bytes(decoder_graph(4, 8, 8, 32, bad_value=bad))
    rehash(bundle_copy, "decoder.onnx")
    gen = Generator(bundle_copy)
    want = rf"decoder's output reaches {shown}: its contract is pixels in \[-1, 1\].*decoder.onnx"
    with pytest.raises(NumericalError, match=want + ".*no image"):
        gen.generate("a small red circle", num=1, **GEN)
    out = tmp_path / "x.png"
    proc = run_cli(
        "--model", str(bundle_copy), "--prompt", "a small red circle", "--out", str(out),
        "--steps", "2", "--sampler", "ddim", check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "decoder's output reaches" in proc.stderr, proc.stderr
    assert not out.exists()


def test_the_live_decoder_is_checked_against_the_manifest(bundle_copy):
    """A decoder whose real output is 16x16 while the manifest says 32x32: refused when the
    session is made, before any sampling."""
    (bundle_copy / "decoder.onnx").write_bytes(decoder_graph(4, 8, 8, 32, out_size=16))
    rehash(bundle_copy, "decoder.onnx")
    with pytest.raises(BackendError, match="decoder"):
        Generator(bundle_copy)


def test_the_decoder_file_is_hashed(bundle_copy):
    data = bytearray((bundle_copy / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (bundle_copy / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder.onnx does not match its sha256"):
        Generator(bundle_copy)


def test_export_refuses_another_autoencoder(latent_trained, tmp_path):
    """The decoder must be the autoencoder the U-Net was trained with: checked by sha256
    before anything is written."""
    other = tmp_path / "ae"
    shutil.copytree(latent_trained["ae"], other)
    from safetensors.torch import load_file, save_file

    w = load_file(str(other / "model.safetensors"))
    k = next(k for k in w if k.startswith("encoder."))  # another latent space
    w[k] = w[k] + 1
    save_file(w, str(other / "model.safetensors"))
    out = tmp_path / "bundle"
    proc = run_cli(
        "export", str(latent_trained["ckpt"]), "--out", str(out), "--autoencoder", str(other),
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "not the one this model was trained with" in proc.stderr
    assert not (out / "manifest.json").exists()


def test_a_pixel_checkpoint_takes_no_autoencoder(trained, latent_trained, tmp_path):
    proc = run_cli(
        "export", str(trained["ckpt"]), "--out", str(tmp_path / "b"),
        "--autoencoder", str(latent_trained["ae"]), check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "applies to latent models only" in proc.stderr


def test_re_export_reuses_the_decoder(latent_trained, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(latent_trained["bundle"], out)
    before = read_manifest(out)
    log = run_cli("export", str(latent_trained["ckpt"]), "--out", str(out)).stderr
    assert "reusing" in log and "decoder.onnx" in log
    assert read_manifest(out) == before
    write_manifest(out, before)


def test_a_decoder_finetuned_on_the_frozen_encoder_exports(latent_trained, tmp_path):
    """train-autoencoder --finetune-decoder: the encoder (and so the latent space the U-Net
    was trained on) is unchanged, the decoder trains on; export accepts it by the encoder's
    identity and ships the new decoder."""
    from safetensors.torch import load_file

    src, ft = latent_trained["ae"], tmp_path / "ft"
    run_cli(
        "train-autoencoder", "--data", str(src.parent / "shapes32.npz"), "--out", str(ft),
        "--finetune-decoder", str(src), "--latent-channels", "4", "--encoder-width", "8",
        "--decoder-width", "8", "--steps", "2", "--batch-size", "8", "--holdout-style", "c",
        "--no-progress",
    )  # fmt: skip
    a, b = load_file(str(src / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    enc = [k for k in a if k.startswith("encoder.")]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    ma, mb = (json.loads((d / "config.json").read_text()) for d in (src, ft))
    assert mb["latent"] == ma["latent"] and mb["encoder_sha256"] == ma["encoder_sha256"]
    out = tmp_path / "bundle"
    run_cli("export", str(latent_trained["ckpt"]), "--out", str(out), "--autoencoder", str(ft))
    old = (latent_trained["bundle"] / "decoder.onnx").read_bytes()
    assert (out / "decoder.onnx").read_bytes() != old
    assert (
        read_manifest(out)["latent"]["autoencoder"]["sha256"]
        != read_manifest(latent_trained["bundle"])["latent"]["autoencoder"]["sha256"]
    )


def test_finetuning_an_autoencoder_without_the_identity_records_is_refused(
    latent_trained, tmp_path
):
    old = tmp_path / "old"
    shutil.copytree(latent_trained["ae"], old)
    meta = json.loads((old / "config.json").read_text())
    del meta["latent"]["shift"], meta["encoder_sha256"]  # as written before both existed
    (old / "config.json").write_text(json.dumps(meta))
    proc = run_cli(
        "train-autoencoder", "--data", str(latent_trained["ae"].parent / "shapes32.npz"),
        "--out", str(tmp_path / "ft"), "--finetune-decoder", str(old), "--steps", "1",
        "--holdout-style", "c", "--latent-channels", "4", "--encoder-width", "8",
        "--decoder-width", "8",
        "--no-progress", check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "predates the latent shift" in proc.stderr, proc.stderr
    assert not (tmp_path / "ft" / "config.json").exists()
