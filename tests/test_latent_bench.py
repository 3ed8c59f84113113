"""``ddpm-rt bench`` on a latent bundle (issue 19): the decoder timed alone, and ``--compare``
between a latent and a pixel bundle, in either order, end to end per image."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

E2E_ROWS = [
    ("ddim-8 guidance 2", 1),
    ("ddim-8 guidance 2", 8),
    ("recommended", 1),
    ("recommended", 8),
]


def _bench(tmp_path, bundle, other, sections: str) -> tuple[dict, str]:
    out = run_cli(
        "bench", str(bundle), "--compare", str(other), "--sections", sections,
        "--batch-sizes", "1,2", "--repeats", "2", "--no-compile",
        "--json", str(tmp_path / "b.json"), "--force",
    ).stdout  # fmt: skip
    return json.loads((tmp_path / "b.json").read_text()), out


def test_bench_latent_bundle_against_a_pixel_one(latent_trained, trained, tmp_path):
    r, out = _bench(tmp_path, latent_trained["bundle"], trained["bundle"], "unet,e2e,cold")
    decode = r["decode_per_image"]["decoder fp32"]
    assert [row["batch"] for row in decode] == [1, 2]
    assert all(row["ms_per_image"] > 0 for row in decode)
    assert "compare decoder fp32" not in r["decode_per_image"]  # the other is a pixel bundle
    assert r["default"]["decoder_precision"] == "fp32"
    assert "decoder alone" in out and "(decode included)" in out
    # the old rows are still there, the U-Net ones on the latent's shape
    assert len(r["unet_per_step"]["compare fp32"]) == 2 and r["unet_cost_vs_compare"]["batch_1"]
    assert "skipped" in r["end_to_end_1_image"]["torch course DDPM"]
    e = r["end_to_end_vs_compare"]
    assert (e["this"]["kind"], e["other"]["kind"]) == ("latent", "pixel")
    assert [(row["setting"], row["batch"]) for row in e["rows"]] == E2E_ROWS
    for row in e["rows"]:
        assert row["this_s_per_image"] > 0 and row["other_s_per_image"] > 0
        assert row["latent_over_pixel"] == pytest.approx(row["ratio"])
    assert "latent/pixel" in out
    cold = r["cold_start"]
    assert cold["ddpm_rt"]["decoder"] == "fp32" and cold["ddpm_rt"]["peak_rss_mb"] > 0
    assert "decoder fp32 loaded and run" in out


def test_bench_pixel_bundle_against_a_latent_one(latent_trained, trained, tmp_path):
    r, _ = _bench(tmp_path, trained["bundle"], latent_trained["bundle"], "unet,e2e")
    assert "decoder fp32" not in r["decode_per_image"]  # this one is a pixel bundle
    assert [row["batch"] for row in r["decode_per_image"]["compare decoder fp32"]] == [1, 2]
    e = r["end_to_end_vs_compare"]
    assert (e["this"]["kind"], e["other"]["kind"]) == ("pixel", "latent")
    for row in e["rows"]:
        assert row["latent_over_pixel"] == pytest.approx(1 / row["ratio"])
