"""Issue 29 item 4, the distilled U-Net measured beside today's default: ``ddpm-rt bench``'s
end-to-end rows for each distilled variant (its own recommended settings, every bench batch
size, timed round-robin with the default; U-Net rows per image, the ratio line, the JSON) and
``ddpm-rt eval``'s ``recommended@PRECISION`` and cost column. The tiny teacher and its 2-step
student of test_distilled_bundle (module fixtures); no timed thresholds."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from test_distilled_bundle import Counting, bundles, ckpts  # noqa: F401 - fixtures

from ddpm_rt.bundle.bundle import Bundle
from ddpm_rt.config import GenerateConfig
from ddpm_rt.errors import InputError
from ddpm_rt.generator import Generator
from ddpm_rt.training.shapes_dataset import make_shapes

from conftest import run_cli


def _rows_per_image(bundle, precision: str, **settings) -> float:
    """U-Net rows one image costs, counted on the backend (3 images in one call)."""
    gen = Generator(bundle, unet_precision=precision)
    calls = Counting(gen.backend, gen.unet_graph)
    gen.backend = calls
    gen.generate("red circle", num=3, seed=0, **settings)
    return sum(len(c["x"]) for c in calls.calls) / 3


def test_bench_times_the_distilled_unet_beside_the_default(bundles, tmp_path):  # noqa: F811
    """``--sections e2e --batch-sizes 1,3``: a default row and a distilled row at each batch
    size, each at its own recommended settings, U-Net rows per image as counted on the
    backend (16 for the default's DDIM-8 at guidance 2, 2 for the student's 2 steps with w),
    the ratios of the medians, and the ratio line."""
    out = tmp_path / "bench.json"
    proc = run_cli("bench", str(bundles / "both"), "--sections", "e2e", "--batch-sizes", "1,3",
                   "--repeats", "1", "--no-compile", "--json", str(out))  # fmt: skip
    e = json.loads(out.read_text())["end_to_end_distilled"]
    assert list(e["rows"]) == ["default", "distilled"]
    default, distilled = e["rows"]["default"], e["rows"]["distilled"]
    want = {"sampler": "ddim", "steps": 8, "eta": 1.0, "guidance": 2.0, "unet_precision": "fp32"}
    assert {k: default[k] for k in want} == want
    want = {"sampler": "ddim", "steps": 2, "eta": 0.0, "guidance": 2.0}
    assert {k: distilled[k] for k in want} == want
    assert distilled["unet_precision"] == "distilled"
    assert default["unet_rows_per_image"] == 16 == _rows_per_image(bundles / "both", "fp32")
    assert distilled["unet_rows_per_image"] == 2 == _rows_per_image(bundles / "both", "distilled")
    for row in (default, distilled):
        assert [f["batch"] for f in row["batches"]] == [1, 3]
        for f in row["batches"]:
            assert f["seconds"] > 0 and f["images_per_s"] == pytest.approx(
                f["batch"] / f["seconds"]
            )
    for d, s in zip(default["batches"], distilled["batches"], strict=True):
        assert s["vs_default"] == pytest.approx(d["seconds"] / s["seconds"])
        assert "vs_default" not in d
    assert e["vs_default"] == {
        "distilled": {f"batch_{s['batch']}": s["vs_default"] for s in distilled["batches"]}
    }
    assert re.search(r"^distilled vs default e2e: batch 1 \d+\.\d\dx, batch 3 \d+\.\d\dx$",
                     proc.stdout, re.M)  # fmt: skip
    assert re.search(r"^distilled +ddim-2 eta 0 g2 +2 +3 ", proc.stdout, re.M)
    assert re.search(r"^default fp32 +ddim-8 eta 1 g2 +16 +1 ", proc.stdout, re.M)


def test_bench_rows_one_per_distilled_precision_none_without(bundles, tmp_path):  # noqa: F811
    """A second distilled precision (the same graph listed again as distilled-int8) gets its
    own row; a bundle without a distilled U-Net gets no such section."""
    from ddpm_rt.tools.bench_distilled import distilled_end_to_end

    shutil.copytree(bundles / "both", tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    m = json.loads(path.read_text())
    m["unet_precisions"]["distilled-int8"] = m["unet_precisions"]["distilled"]
    path.write_text(json.dumps(m))
    gen = Generator(tmp_path / "b")
    default = GenerateConfig().with_defaults(gen.bundle.recommended)
    e = distilled_end_to_end(gen, default, "red circle", (2,), 1)
    assert list(e["rows"]) == ["default", "distilled", "distilled-int8"]
    assert [e["rows"][p]["unet_rows_per_image"] for p in e["rows"]] == [16, 2, 2]
    assert list(e["vs_default"]) == ["distilled", "distilled-int8"]
    assert list(e["vs_default"]["distilled-int8"]) == ["batch_2"]
    plain = Generator(bundles / "plain")
    assert distilled_end_to_end(plain, default, "red circle", (1,), 1) is None


@pytest.fixture(scope="module")
def eval_data(ckpts):  # noqa: F811
    """The shapes as a tiny 'emoji' set: two styles, the label names as held-out prompts."""
    d = make_shapes(24, size=8, seed=2)
    d["styles"] = np.array(["a", "b"] * 12)
    d["heldout"] = d["label_names"]
    np.savez(ckpts / "eval.npz", **d)
    return ckpts / "eval.npz"


def test_eval_recommended_at_a_precision_is_that_unets_own(bundles):  # noqa: F811
    from ddpm_rt.training.evaluate import expand_recommended, parse_setting

    both = bundles / "both"
    setting = expand_recommended(both, "recommended@distilled")
    assert setting == "ddim:2:0@distilled@g2"
    p = parse_setting(setting)
    assert (p["precision"], p["guidance"], p["kw"]) == (
        "distilled", 2.0, {"sampler": "ddim", "steps": 2, "eta": 0.0}
    )  # fmt: skip
    assert Bundle.load(both).recommended_for("distilled")["steps"] == 2
    assert expand_recommended(both, "ddim:4@g2") == "ddim:4@g2"
    with pytest.raises(InputError, match="has no int8 U-Net"):
        expand_recommended(both, "recommended@int8")
    with pytest.raises(InputError, match="write recommended or recommended@PRECISION"):
        expand_recommended(both, "recommended@distilled@g3")


def test_eval_runs_the_distilled_unet_and_costs_one_row_per_step(
    bundles,  # noqa: F811
    eval_data,
    monkeypatch,
    tmp_path,
):
    """``recommended@distilled`` and ``ddim:2:0@distilled@g2`` (the same row) run the
    distilled U-Net with w fed, one row per image per step (counted on the backend): cost 2,
    not doubled by guidance; the teacher at the same setting costs 4. The row names its
    precision."""
    import ddpm_rt.training.evaluate as ev

    made = []

    class Counted(Generator):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.backend = Counting(self.backend, self.unet_graph)
            made.append(self)

    monkeypatch.setattr(ev, "Generator", Counted)
    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path))
    r = ev.evaluate(bundles / "both", eval_data, ("recommended@distilled", "ddim:2:0@g2"),
                    per_concept=1, judge_steps=5, log=lambda s: None)  # fmt: skip
    rows = r["settings"]
    assert list(rows) == ["ddim:2:0@distilled@g2", "ddim:2:0@g2"]
    student, teacher = rows["ddim:2:0@distilled@g2"], rows["ddim:2:0@g2"]
    assert (student["precision"], student["guidance"], student["cost"]) == ("distilled", 2.0, 2)
    assert (teacher["precision"], teacher["cost"]) == ("fp32", 4)
    by_precision = {g.unet_precision: g.backend.calls for g in made}
    images = sum(row["n"] for row in student.values() if isinstance(row, dict) and "n" in row)
    calls = by_precision["distilled"]
    assert all(c["w"].ravel().tolist() == [2.0] * len(c["x"]) for c in calls)
    assert sum(len(c["x"]) for c in calls) == student["cost"] * images
    calls = by_precision["fp32"]
    assert sum(len(c["x"]) for c in calls) == teacher["cost"] * images


def test_the_default_rule_never_picks_a_distilled_row():
    """``choose_default`` chooses among fp32 rows only: a cheaper, better distilled row is
    reported, not made the bundle's default (its own recommended lives in its entry)."""
    from ddpm_rt.training.evaluate import choose_default

    def row(precision, cost, top5, frechet=1.0):
        return {"sampler": "ddim", "steps": cost // 2, "eta": 0.0, "guidance": 2.0,
                "precision": precision, "cost": cost, "train_captions": {"frechet": frechet},
                "heldout_paraphrases": {"top5": top5}}  # fmt: skip

    report = {
        "concepts": 100,
        "per_concept": 4,
        "settings": {
            "ddpm@g1": {**row("fp32", 500, 0.5), "steps": None},
            "ddim:8:1@g2": row("fp32", 16, 0.8),
            "ddim:4:0@distilled@g2": row("distilled", 4, 0.9),
        },
    }
    assert choose_default(report)["setting"] == "ddim:8:1@g2"
