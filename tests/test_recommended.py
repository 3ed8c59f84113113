"""Defaults live in the bundle: a manifest's ``recommended`` settings are validated, used when
the caller gives none, and each model gets its own."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ddpm_rt import Generator
from ddpm_rt.bundle.bundle import Bundle, write_recommended
from ddpm_rt.bundle.manifest import validate_manifest
from ddpm_rt.cli.generate import default_model
from ddpm_rt.config import FALLBACK, GenerateConfig
from ddpm_rt.errors import BundleError
from ddpm_rt.images import read_provenance

from conftest import run_cli


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """A copy of the shipped model that recommends other settings."""
    path = tmp_path_factory.mktemp("m") / "other"
    shutil.copytree(default_model(), path)
    write_recommended(path, {"sampler": "dpm++2m-sde", "steps": 6, "guidance": 1.5})
    return path


def _manifest() -> dict:
    return json.loads((default_model() / "manifest.json").read_text())


@pytest.mark.parametrize(
    ("rec", "why"),
    [
        ({"sampler": "euler"}, "recommended.sampler"),
        ({"sampler": "ddim", "steps": 501}, "recommended.steps"),
        ({"sampler": "ddim", "steps": 0}, "recommended.steps"),
        ({"sampler": "ddpm", "steps": 20}, "ddpm runs all"),
        ({"sampler": "dpm++2m", "eta": 0.5}, "applies to ddim only"),
        ({"sampler": "ddim", "eta": 1.5}, "recommended.eta"),
        ({"guidance": 51}, "recommended.guidance"),
        ({"guidance": float("nan")}, "recommended.guidance"),
        ({"guidance": "2"}, "recommended.guidance"),
        ({"steps": 8}, "need the sampler"),
        ({"sampler": "ddim", "spacing": "random"}, "recommended.spacing"),
        ({"sampler": "ddim", "temperature": 2}, "unknown setting"),
        ([1, 2], "recommended: must be an object"),
    ],
)
def test_bad_recommended_settings_are_refused_by_name(rec, why):
    m = _manifest()
    m["recommended"] = rec
    with pytest.raises(BundleError, match=why):
        validate_manifest(m)


def test_good_recommended_settings_pass():
    m = _manifest()
    for rec in ({}, {"guidance": 0.0}, {"sampler": "ddpm", "steps": 500, "guidance": 1}):
        m["recommended"] = rec
        validate_manifest(m)


def test_the_shipped_model_recommends_the_rules_choice():
    assert Bundle.load(default_model(), hash_all=False).recommended == {
        "sampler": "ddim",
        "steps": 8,
        "eta": 1.0,
        "guidance": 2.0,
    }


def test_each_model_gets_its_own_defaults(other):
    ours, theirs = Generator(default_model(), threads=1), Generator(other, threads=1)
    a = theirs.generate("red apple", num=2)
    want = ours.generate("red apple", num=2, sampler="dpm++2m-sde", steps=6, guidance=1.5)
    np.testing.assert_array_equal(a, want)  # the other model's own settings
    assert not np.array_equal(a, ours.generate("red apple", num=2))
    # a caller's setting wins; steps come with the sampler they were recommended for
    np.testing.assert_array_equal(
        theirs.generate("red apple", sampler="ddim"),
        ours.generate("red apple", sampler="ddim", guidance=1.5),
    )
    job = theirs.prepare("red apple", sampler="ddim")
    assert (job.config.steps, job.config.eta, job.config.guidance) == (8, 1.0, 1.5)


def test_a_bundle_without_recommended_settings_uses_the_fallback():
    cfg = GenerateConfig().with_defaults({})
    assert (cfg.sampler, cfg.eta, cfg.guidance) == tuple(
        FALLBACK[k] for k in ("sampler", "eta", "guidance")
    )
    assert cfg.steps is None  # the sampler's own default, clamped to the bundle's T
    assert GenerateConfig().with_defaults({"guidance": 3.0}).guidance == 3.0


def test_cli_records_the_settings_it_used(other, tmp_path):
    out = tmp_path / "a.png"
    run_cli("--model", str(other), "--prompt", "red apple", "--out", str(out))
    prov = read_provenance(out)
    assert (prov["sampler"], prov["steps"], prov["eta"], prov["guidance"]) == (
        "dpm++2m-sde",
        6,
        None,
        1.5,
    )
    assert prov["spacing"] == "time"


def test_eval_write_recommended_is_refused_before_work_without_the_reference_row(tmp_path):
    r = run_cli(
        "eval", "--data", str(tmp_path / "none.npz"), "--settings", "ddim:8:1",
        "--write-recommended", check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "needs the rule's reference row" in r.stderr
