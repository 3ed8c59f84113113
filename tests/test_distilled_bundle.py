"""Issue 29, the bundle and runtime side of a distilled U-Net: ``ddpm-rt export`` of a
distilled checkpoint (the graph's 4th input ``w``, the manifest's ``distilled`` and
``recommended``, ``requires``), ``--as-variant`` (teacher and student in one bundle), and the
runtime: w fed, one U-Net row per image per step (counted on the backend), a negative prompt
refused, other steps warned about, old bundles unchanged. Tiny label models: 8x8, n_feat 8,
T = 50."""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from ddpm_rt.bundle.bundle import Bundle
from ddpm_rt.bundle.manifest import GUIDANCE_DISTILLED, validate_manifest
from ddpm_rt.config import DistillationWarning
from ddpm_rt.core.schedule import timestep_input
from ddpm_rt.errors import BundleError, InputError
from ddpm_rt.generator import Generator
from ddpm_rt.training.distill import DistillConfig, distill
from ddpm_rt.training.model import load_model
from ddpm_rt.training.shapes_dataset import make_shapes
from ddpm_rt.training.train import TrainConfig, train

from conftest import run_cli


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny teacher ("teacher"), its guidance student ("g", stage guidance) and the 2-step
    student ("s/steps-2", stage steps 4 -> 2). Short runs (~10 s): what is tested here is the
    plumbing; how well a student learns is test_distill's."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("distilled")
    np.savez(d / "s.npz", **make_shapes(64, size=8, seed=1))
    train(
        TrainConfig(data=str(d / "s.npz"), out=str(d / "teacher"), steps=40, batch_size=16,
                    n_feat=8, sample_every=0, timesteps=50, lr=3e-3),
        progress=False,
    )  # fmt: skip
    base = dict(batch_size=16, lr=1e-3, device="cpu", ema_decay=0.0)
    distill(DistillConfig(teacher=str(d / "teacher"), out=str(d / "g"), iterations=20, **base))
    distill(
        DistillConfig(teacher=str(d / "g"), out=str(d / "s"), stage="steps", start_steps=4,
                      final_steps=2, iterations=10, **base),
        progress=False,
    )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def bundles(ckpts):
    """"plain": the teacher's bundle; "both": the same with the 2-step student added as its
    ``distilled`` variant (through the CLI, as a user does); "student": the student exported
    on its own."""
    d = ckpts
    run_cli("export", str(d / "teacher"), "--out", str(d / "plain"))
    shutil.copytree(d / "plain", d / "both")
    run_cli("export", str(d / "s" / "steps-2"), "--out", str(d / "both"), "--as-variant")
    run_cli("export", str(d / "s" / "steps-2"), "--out", str(d / "student"))
    return d


class Counting:
    """The backend, with each U-Net call's feeds recorded (the calls are real)."""

    def __init__(self, backend, graph):
        self.inner, self.graph, self.calls = backend, graph, []

    def run(self, graph, feeds):
        if graph == self.graph:
            self.calls.append({k: v.copy() for k, v in feeds.items()})
        return self.inner.run(graph, feeds)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _counting(gen: Generator) -> Counting:
    gen.backend = Counting(gen.backend, gen.unet_graph)
    return gen.backend


def test_export_of_a_distilled_checkpoint_describes_it(bundles):
    """The student's own bundle: the U-Net takes w, the manifest says what it was distilled
    for and recommends exactly that (DDIM eta 0 at its 2 timesteps, guidance 2), and the
    bundle requires the feature."""
    m = json.loads((bundles / "student" / "manifest.json").read_text())
    assert [i["name"] for i in m["graphs"]["unet"]["inputs"]] == ["x", "t", "c", "w"]
    assert m["requires"] == [GUIDANCE_DISTILLED]
    entry = m["unet_precisions"]["fp32"]
    assert entry["distilled"]["guidance"] == {"w_min": 1.0, "w_max": 4.0}
    assert entry["distilled"]["steps"] == {
        "sampler": "ddim", "eta": 0.0, "spacing": "time", "timesteps": [50, 25]
    }  # fmt: skip
    assert m["recommended"] == entry["recommended"] == {
        "guidance": 2.0, "sampler": "ddim", "steps": 2, "eta": 0.0
    }  # fmt: skip
    teacher = json.loads((bundles / "plain" / "manifest.json").read_text())
    assert "requires" not in teacher and "unet_precisions" not in teacher
    assert [i["name"] for i in teacher["graphs"]["unet"]["inputs"]] == ["x", "t", "c"]


def test_the_runtime_feeds_w_and_makes_one_row_per_image_per_step(bundles):
    """At guidance 2, the teacher's U-Net is called once a step with 2 rows per image (the
    conditional and the unconditional pass); the distilled variant once a step with 1 row
    per image and w = 2 fed, at its recommended 2 steps -- counted on the backend. Its eps
    is the torch student's given that w."""
    teacher = Generator(bundles / "both")
    t_calls = _counting(teacher)
    teacher.generate("red circle", num=3, seed=1, guidance=2.0, steps=4, sampler="ddim")
    assert [len(c["x"]) for c in t_calls.calls] == [6] * 4
    assert all(set(c) == {"x", "t", "c"} for c in t_calls.calls)

    gen = Generator(bundles / "both", unet_precision="distilled")
    assert gen.unet_graph == "unet_distilled" and gen.unet_takes_w
    calls = _counting(gen)
    images = gen.generate("red circle", num=3, seed=1)  # its recommended: 2 steps, w = 2
    assert images.shape == (3, 8, 8, 3)
    assert [len(c["x"]) for c in calls.calls] == [3, 3]
    assert all(np.array_equal(c["w"], np.full((3, 1), 2.0, np.float32)) for c in calls.calls)
    assert [round(float(c["t"][0, 0]) * 50) for c in calls.calls] == [50, 25]

    student, _ = load_model(bundles / "s" / "steps-2")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8), dtype=np.float32)
    c = np.stack([gen.context("red circle"), gen.context("blue square")])
    got = gen.eps(x, 30, c, guidance=3.0)
    with torch.no_grad():
        t = torch.full((2, 1), timestep_input(30, 50))
        want = student(torch.from_numpy(x), t, torch.from_numpy(c), torch.full((2, 1), 3.0))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)


def test_negative_prompt_refused_and_other_steps_warned(bundles):
    gen = Generator(bundles / "both", unet_precision="distilled")
    with pytest.raises(InputError, match="negative prompt needs the unconditional pass"):
        gen.generate("red circle", negative_prompt="blue square", seed=1)
    with pytest.warns(DistillationWarning, match=r"for ddim at 2 steps \[50, 25\], not ddim at 4"):
        gen.generate("red circle", seed=1, steps=4)
    with pytest.warns(DistillationWarning, match="not dpm\\+\\+2m at 2 steps"):
        gen.generate("red circle", seed=1, steps=2, sampler="dpm++2m")
    with pytest.warns(DistillationWarning, match="guidance 6 is outside the 1-4"):
        gen.generate("red circle", seed=1, guidance=6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at what it was distilled for: nothing to say
        gen.generate("red circle", seed=1, guidance=3.5)
        gen.generate("red circle", seed=1, eta=1.0)  # eta is free (docs/bundle-format.md)
    # the teacher in the same bundle keeps its negative prompt and its defaults
    teacher = Generator(bundles / "both")
    teacher.generate("red circle", negative_prompt="blue square", seed=1, steps=2, sampler="ddim")


def test_cli_runs_the_variant_and_refuses_a_negative_prompt(bundles, tmp_path):
    out = tmp_path / "a.png"
    run_cli("--model", str(bundles / "both"), "--prompt", "red circle", "--unet-precision",
            "distilled", "--out", str(out))  # fmt: skip
    assert out.is_file()
    r = run_cli("--model", str(bundles / "both"), "--prompt", "red circle", "--unet-precision",
                "distilled", "--negative-prompt", "blue", "--out", str(tmp_path / "b.png"),
                check=False)  # fmt: skip
    assert r.returncode != 0 and not (tmp_path / "b.png").exists()
    assert r.stderr.strip().splitlines()[-1].startswith("error: a negative prompt needs")


def test_as_variant_refuses_an_ordinary_checkpoint_and_leaves_the_bundle(bundles, tmp_path):
    shutil.copytree(bundles / "plain", tmp_path / "b")
    before = (tmp_path / "b" / "manifest.json").read_bytes()
    r = run_cli("export", str(bundles / "teacher"), "--out", str(tmp_path / "b"),
                "--as-variant", check=False)  # fmt: skip
    assert r.returncode != 0 and "is not distilled" in r.stderr
    assert (tmp_path / "b" / "manifest.json").read_bytes() == before


def test_manifest_rules_for_the_w_input(bundles):
    """A graph that takes w needs ``requires``; ``requires`` without such a graph, a
    distilled entry whose graph lacks w, and bad timesteps are refused, naming the field."""
    m = json.loads((bundles / "both" / "manifest.json").read_text())
    validate_manifest(m)
    assert Bundle.load(bundles / "both").distillation("fp32") is None

    def refused(change, match):
        bad = copy.deepcopy(m)
        change(bad)
        with pytest.raises(BundleError, match=match):
            validate_manifest(bad)

    refused(lambda b: b.pop("requires"), "requires: must list 'guidance-distilled'")
    def not_distilled(b):
        b["unet_precisions"]["distilled"].pop("distilled")
        b.pop("requires")

    refused(not_distilled, r"graphs.unet_distilled: has inputs \[.x., .t., .c., .w.\]")
    refused(lambda b: b["unet_precisions"]["distilled"]["distilled"]["steps"].update(
        timesteps=[25, 50]), "distilled.steps.timesteps")  # fmt: skip
    refused(lambda b: b["unet_precisions"]["distilled"]["recommended"].update(eta=2),
            "unet_precisions.distilled.recommended.eta")  # fmt: skip

    def drop_variant(b):
        del b["unet_precisions"]["distilled"]

    refused(drop_variant, "lists 'guidance-distilled' but no U-Net graph takes w")


def test_a_variants_own_recommended_settings_are_written_and_used(bundles, tmp_path):
    """``write_recommended(..., precision)`` writes that U-Net's own settings (validated), the
    runtime then fills them in for it only; the variant rule picks the cheapest row within
    one standard error of the best held-out recognition@5, among that U-Net's rows."""
    from ddpm_rt.bundle.bundle import write_recommended
    from ddpm_rt.training.evaluate import choose_variant_default

    shutil.copytree(bundles / "both", tmp_path / "b")
    write_recommended(tmp_path / "b", {"sampler": "ddim", "steps": 2, "eta": 1.0,
                                       "guidance": 3.0}, "distilled")  # fmt: skip
    b = Bundle.load(tmp_path / "b")
    assert b.recommended_for("distilled") == {"sampler": "ddim", "steps": 2, "eta": 1.0,
                                              "guidance": 3.0}  # fmt: skip
    assert b.recommended_for("fp32") == b.recommended
    job = Generator(b, unet_precision="distilled").prepare("red circle", seed=1)
    assert (job.config.eta, job.config.guidance, job.config.steps) == (1.0, 3.0, 2)
    with pytest.raises(InputError, match="has no int8 U-Net"):
        write_recommended(tmp_path / "b", {"sampler": "ddim"}, "int8")

    def row(precision, cost, top5):
        return {"precision": precision, "cost": cost, "sampler": "ddim", "steps": cost,
                "eta": 1.0, "guidance": 2.0, "heldout_paraphrases": {"top5": top5}}  # fmt: skip

    report = {"concepts": 400, "per_concept": 1, "settings": {
        "ddim:8:1": row("fp32", 16, 0.80),  # the best overall, but not the variant's
        "ddim:4:0@distilled": row("distilled", 4, 0.70),
        "ddim:4:1@distilled": row("distilled", 4, 0.75),
        "ddim:8:1@distilled": row("distilled", 8, 0.76),
        "ddim:2:1@distilled": row("distilled", 2, 0.60),
    }}  # fmt: skip
    assert choose_variant_default(report, "distilled")["setting"] == "ddim:4:1@distilled"
    with pytest.raises(InputError, match="no setting of this evaluation ran the int8"):
        choose_variant_default(report, "int8")
