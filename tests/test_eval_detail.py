"""Issue 19's evaluation: the judge at 64x64, larger images judged after box downsampling,
the detail distance with a bicubic baseline, and the autoencoder's report. Tiny data."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

torch = pytest.importorskip("torch", reason="evaluation needs ddpm-rt[train]")


def _checker_or_grey(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: a 1-px black/white checkerboard; class 1: flat grey. Box-downsampled to a
    quarter of the size both are the same grey: only a judge at full size can tell them."""
    yy, xx = np.mgrid[:size, :size]
    board = np.repeat((((yy + xx) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    grey = np.full_like(board, 128)
    labels = np.arange(n) % 2
    return np.stack([board if c == 0 else grey for c in labels]), labels


def test_judge_at_64_sees_detail_and_the_16_judge_is_unchanged(monkeypatch, tmp_path):
    from ddpm_rt.training import judge as jm
    from ddpm_rt.training.detail import to_size

    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path))
    assert not list(jm.Judge(5).stem.parameters())  # 16x16: the original module, same keys
    assert next(iter(jm.Judge(5).state_dict())) == "body.0.weight"
    images, labels = _checker_or_grey(16, 64)
    judge = jm.cached_judge(images, labels, 2, steps=25, seed=0)
    assert len(judge.stem) == 8  # two halvings: 64 -> 16
    assert jm.topk_hits(jm.judge_outputs(judge, images)[0], labels, 1) == 1.0
    again = jm.cached_judge(images, labels, 2, steps=25, seed=0)  # from the cache, same size
    np.testing.assert_array_equal(
        jm.judge_outputs(judge, images)[1], jm.judge_outputs(again, images)[1]
    )
    small = to_size(images, 16)  # box: both classes the same grey
    assert np.ptp(small.astype(int)) <= 1


def test_bicubic_baseline_path_upscales_with_pillow_bicubic(monkeypatch, tmp_path):
    from ddpm_rt.training.detail import DetailReference, to_size

    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(small[1]).resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(to_size(small, 64)[1], want)
    big = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    box = np.asarray(Image.fromarray(big[0]).resize((16, 16), Image.Resampling.BOX))
    np.testing.assert_array_equal(to_size(big, 16)[0], box)
    images, labels = _checker_or_grey(16, 64)
    np.savez(tmp_path / "d64.npz", images=images, labels=labels, label_names=["board", "grey"])
    ref = DetailReference(tmp_path / "d64.npz", steps=25)
    # the renders themselves are at distance ~0; their 16x16 versions upscaled lose the board
    assert ref.frechet(images) < 1e-3 * ref.frechet(to_size(images, 16))


@pytest.fixture(scope="module")
def latent_data(latent_trained, tmp_path_factory):
    """The latent fixture's 32x32 shapes as an 'emoji' set (styles a/b/c, held-out prompts)
    and the same at 8x8 (box) for the judge: 32 -> 8 is the 64 -> 16 of the real data."""
    d = tmp_path_factory.mktemp("latent_data")
    with np.load(latent_trained["ae"].parent / "shapes32.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["heldout"] = np.array([f"a {n} shape\nsome {n}" for n in arrays["label_names"]])
    np.savez(d / "d32.npz", **arrays)
    np.savez(d / "d8.npz", **{**arrays, "images": _box(arrays["images"], 8)})
    return d / "d32.npz", d / "d8.npz"


def _box(images, size):
    return np.stack(
        [np.asarray(Image.fromarray(i).resize((size, size), Image.Resampling.BOX)) for i in images]
    )


def test_eval_judges_a_latent_bundle_downsampled_and_reports_detail(
    latent_trained, latent_data, text_trained, monkeypatch, tmp_path
):
    import ddpm_rt.training.evaluate as ev

    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path))
    d32, d8 = latent_data
    judged = []
    real = ev.judge_outputs
    monkeypatch.setattr(ev, "judge_outputs", lambda j, im: judged.append(im) or real(j, im))
    r = ev.evaluate(
        latent_trained["bundle"],
        d8,
        settings=("ddim:2:0",),
        per_concept=1,
        judge_steps=5,
        log=lambda s: None,
        detail_data=d32,
        baseline=text_trained["bundle"],
        detail_judge_steps=5,
    )
    row = r["settings"]["ddim:2:0@g1"]["train_captions"]
    assert row["_images"].shape == (12, 32, 32, 3)
    assert r["judged_after"] == "box downsampling 32 -> 8"
    assert all(im.shape[1:] == (8, 8, 3) for im in judged)  # the judge only ever saw 8x8
    assert any(np.array_equal(im, _box(row["_images"], 8)) for im in judged)
    assert row["_baseline_images"].shape == (12, 16, 16, 3)
    assert row["frechet_detail"] > 0 and row["baseline_frechet_detail"] > 0
    assert row["detail_ratio"] == pytest.approx(
        row["frechet_detail"] / row["baseline_frechet_detail"]
    )
    assert r["detail"]["size"] == 32 and r["detail"]["upsample"] == "bicubic"
    ev.save_report(r, tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())["settings"]["ddim:2:0@g1"]
    assert "_baseline_images" not in saved["heldout_paraphrases"]


def test_eval_baseline_needs_detail_data(text_trained, latent_data):
    proc = run_cli(
        "eval", str(text_trained["bundle"]), "--data", str(latent_data[1]), "--baseline",
        str(text_trained["bundle"]), check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "--detail-data" in proc.stderr


def test_eval_autoencoder_reports_psnr_recognition_and_floor(latent_trained, latent_data, tmp_path):
    from ddpm_rt.training.autoencoder import load_autoencoder
    from ddpm_rt.training.autoencoder_eval import reconstruct

    d32, d8 = latent_data
    out = tmp_path / "ae.json"
    run_cli(
        "eval-autoencoder", str(latent_trained["ae"]), "--data", str(d32), "--judge-data",
        str(d8), "--holdout-style", "c", "--judge-steps", "5", "--detail-judge-steps", "5",
        "--json", str(out),
    )  # fmt: skip
    r = json.loads(out.read_text())
    model, meta = load_autoencoder(latent_trained["ae"])
    assert r["heldout"]["psnr"] == pytest.approx(meta["psnr_heldout"], abs=1e-4)
    with np.load(d32) as z:
        images, styles = z["images"], z["styles"]
    recon = reconstruct(model, images)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    held = styles == "c"
    mse = ((recon[held].astype(float) - images[held]) / 255) ** 2
    psnr_u8 = float(np.mean(-10 * np.log10(mse.mean(axis=(1, 2, 3)))))
    assert psnr_u8 == pytest.approx(r["heldout"]["psnr"], abs=0.2)  # what was judged
    assert set(r["styles"]) == {"a", "b", "c"}
    for part in ("renders", "originals", "reconstructions"):
        h = r["heldout"][part]
        assert 0 <= h["top1"] <= h["top5"] <= 1 and h["n"] == held.sum()
    assert r["detail"]["frechet_reconstructions"] > 0 and r["detail"]["size"] == 32
    assert r["detail"]["n_heldout"] == held.sum() and r["detail"]["frechet_renders_heldout"] >= 0


def test_recommended_setting_is_the_bundles_own():
    from ddpm_rt.bundle.bundle import Bundle
    from ddpm_rt.cli.generate import default_model
    from ddpm_rt.training.evaluate import parse_setting, recommended_setting

    rec = Bundle.load(default_model(), hash_all=False).recommended
    setting = recommended_setting(default_model())
    parsed = parse_setting(setting)
    assert parsed["kw"] == {k: rec[k] for k in ("sampler", "steps", "eta")}
    assert parsed["guidance"] == rec["guidance"]
    # numbers as a person writes them (ddim:8:1@g2, not ddim:8:1.0@g2.0): the row's key
    assert setting == f"{rec['sampler']}:{rec['steps']}:{rec['eta']:g}@g{rec['guidance']:g}"


def test_eval_autoencoder_heldout_only_trains_one_judge(latent_trained, latent_data, monkeypatch):
    import ddpm_rt.training.autoencoder_eval as ae

    d32, d8 = latent_data
    trained = []
    real = ae.cached_judge
    monkeypatch.setattr(
        ae, "cached_judge", lambda im, *a, **k: trained.append(len(im)) or real(im, *a, **k)
    )
    r = ae.evaluate_autoencoder(
        latent_trained["ae"], d32, d8, "c", judge_steps=5, detail_judge_steps=5,
        log=lambda s: None, per_style=False,
    )  # fmt: skip
    with np.load(d8) as z:
        assert trained == [int((z["styles"] != "c").sum())]  # only the judge without style c
    assert "originals" not in r["styles"]["a"] and "reconstructions" in r["heldout"]
