"""Issue 29, ``ddpm-rt distill`` (torch side): the guidance-embedding student, stage
"guidance" (matches the teacher's guided output), stage "steps" (one step matches two of the
teacher's), exact resume, and models without the flag unchanged. Tiny models: 8x8 images,
n_feat 8, T = 50."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ddpm_rt.core.samplers import spaced_timesteps
from ddpm_rt.core.schedule import NoiseSchedule, ScheduleConfig
from ddpm_rt.errors import InputError
from ddpm_rt.training.data import load_dataset
from ddpm_rt.training.distill import (
    DistillConfig,
    Distiller,
    distill,
    guided_eps,
    halving_rounds,
    load_teacher,
    step_gaps,
    step_plan,
)
from ddpm_rt.training.model import ContextUnet, EpsFromV, UNetConfig, load_model
from ddpm_rt.training.shapes_dataset import make_shapes
from ddpm_rt.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny teacher checkpoint "teacher" (200 training steps, ~3 s) and its data. Its
    context embeddings' last layers are then scaled by 4, so that guidance matters: trained
    this little it hardly uses its context (|eps_c - eps_u|^2 ~ 1e-5, 1.6e-4 scaled)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("distill")
    np.savez(d / "s.npz", **make_shapes(128, size=8, seed=1))
    np.savez(d / "held.npz", **make_shapes(32, size=8, seed=77))
    cfg = TrainConfig(
        data=str(d / "s.npz"),
        out=str(d / "teacher"),
        steps=200,
        batch_size=32,
        n_feat=8,
        sample_every=0,
        timesteps=50,
        lr=3e-3,
    )
    train(cfg, progress=False)
    model, _ = load_model(d / "teacher")
    with torch.no_grad():
        for emb in (model.contextembed1, model.contextembed2):
            emb.model[-1].weight.mul_(4)
            emb.model[-1].bias.mul_(4)
    save_file(model.state_dict(), d / "teacher" / "model.safetensors")
    return d


@pytest.fixture(scope="module")
def guided(teacher):
    """Stage "guidance" of the teacher (300 steps, ~8 s): OUT "g"."""
    summary = distill(_cfg(teacher, "g", iterations=300, batch_size=32, ema_decay=0.0))
    assert summary["steps"] == 300
    return teacher / "g"


def _cfg(d, out, **kw) -> DistillConfig:
    base = dict(teacher=str(d / "teacher"), out=str(d / out), batch_size=16, lr=1e-3)
    return DistillConfig(**{**base, "device": "cpu", **kw})


def _held(d, seed=5):
    """Held-out x0, contexts, noise and w in [1, 4]."""
    held = load_dataset(d / "held.npz")
    x0 = torch.from_numpy(held.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    w = 1 + 3 * torch.rand(len(x0), 1, generator=g)
    return x0, torch.from_numpy(held.contexts), noise, w


# -- the model flag ---------------------------------------------------------------------
def test_model_without_the_flag_is_unchanged():
    """No ``guidance_embedding``: the keys, init and outputs of before (a copy of the
    pre-issue-29 forward, inlined, is the reference), the config dict without the field, and
    no w input; with it, the student starts as the teacher's conditional prediction."""
    cfg = UNetConfig(n_feat=8, context_dim=12, height=8, width=8)
    assert "guidance_embedding" not in cfg.to_dict()
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    model = ContextUnet(cfg).eval()
    assert not any("guidance" in k for k in model.state_dict())
    torch.manual_seed(0)
    again = ContextUnet(UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))))
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    g = torch.Generator().manual_seed(1)
    x, t, c = (
        torch.randn(3, 3, 8, 8, generator=g),
        torch.rand(3, 1, generator=g),
        torch.randn(3, 12),
    )

    def before(m, x, t, c):  # ContextUnet.forward before issue 29
        n = m.config.n_feat
        x = m.init_conv(x)
        down1 = m.down1(x)
        down2 = m.attn(m.down2(down1))
        hidden = m.to_vec(down2)
        cemb1 = m._gate(m.contextembed1(c)).view(-1, 2 * n, 1, 1)
        temb1 = m.timeembed1(t).view(-1, 2 * n, 1, 1)
        cemb2 = m._gate(m.contextembed2(c)).view(-1, n, 1, 1)
        temb2 = m.timeembed2(t).view(-1, n, 1, 1)
        up1 = m.up0(hidden)
        up2 = m.up1(cemb1 * up1 + temb1, down2)
        up3 = m.up2(cemb2 * up2 + temb2, down1)
        return m.out(torch.cat((up3, x), 1))

    with torch.no_grad():
        assert torch.equal(model(x, t, c), before(model, x, t, c))
        with pytest.raises(TypeError, match="guidance_embedding"):
            model(x, t, c, torch.ones(3, 1))
        student = ContextUnet(UNetConfig(**{**cfg.to_dict(), "guidance_embedding": True}))
        missing, unexpected = student.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and {k.split(".")[0] for k in missing} == {
            "guidanceembed1",
            "guidanceembed2",
        }
        assert torch.equal(student.eval()(x, t, c, torch.full((3, 1), 3.0)), model(x, t, c))


def test_eps_from_v_is_exact():
    """The v student's eps wrapper: eps = sigma_t x + alpha_t v at the integer timestep of
    the time input, and load_model returns it for a "v" checkpoint."""
    sched = NoiseSchedule(ScheduleConfig(timesteps=500))
    net = ContextUnet(UNetConfig(n_feat=8, context_dim=4, height=8, width=8)).eval()
    model = EpsFromV(net, sched.alpha_bar64)
    ts = np.array([1, 62, 250, 438, 500])
    t_in = torch.from_numpy((ts / 500).astype(np.float32)).view(-1, 1)
    assert torch.equal(model.table_index(t_in), torch.from_numpy(ts))
    x, c = torch.randn(5, 3, 8, 8), torch.randn(5, 4)
    with torch.no_grad():
        v, eps = net(x, t_in, c), model(x, t_in, c)
    ab = torch.from_numpy(sched.alpha_bar64[ts]).view(-1, 1, 1, 1)
    ref = ((1 - ab).sqrt() * x.double() + ab.sqrt() * v.double()).float()
    torch.testing.assert_close(eps, ref, rtol=0, atol=1e-6)
    assert list(model.state_dict()) == [f"net.{k}" for k in net.state_dict()]


def test_step_plan_is_the_runtime_ddim_grid():
    """The students' steps are the runtime's spaced_timesteps; for T = 500 each halving's
    teacher grid holds the student's (16 -> 8 -> 4 -> 2), so t' is the teacher's own step."""
    sched = NoiseSchedule(ScheduleConfig(timesteps=500))
    for n in (16, 8, 4):
        plan = step_plan(sched, n)
        teacher = spaced_timesteps(sched, n, "time")
        np.testing.assert_array_equal(plan[:, 0], spaced_timesteps(sched, n // 2, "time"))
        np.testing.assert_array_equal(plan[:, 0], teacher[::2])
        np.testing.assert_array_equal(plan[:, 1], teacher[1::2])
        np.testing.assert_array_equal(plan[:, 2], np.append(plan[1:, 0], 0))
    assert step_plan(sched, 8).tolist() == [[500, 438, 375], [375, 312, 250], [250, 188, 125],
                                            [125, 62, 0]]  # fmt: skip
    assert halving_rounds(8, 2) == [8, 4] and halving_rounds(16, 4) == [16, 8]
    with pytest.raises(InputError, match="power of 2"):
        halving_rounds(12, 2)


# -- stage "guidance" ---------------------------------------------------------------------
def test_guidance_student_matches_the_guided_teacher(teacher, guided):
    """After a short stage "guidance", the student's one call is closer to the teacher's
    guided eps (two calls) on held-out (x_t, t, c, w) than the teacher's conditional pass
    is, and it uses w; the checkpoint records the flag, the w range and no distilled steps."""
    student, meta = load_model(guided)
    assert meta["unet"]["guidance_embedding"] is True
    assert meta["guidance"] == {"w_min": 1.0, "w_max": 4.0}
    assert meta["distilled_steps"] is None and meta["prediction"] == "eps"
    tmodel, _ = load_model(teacher / "teacher")
    x0, c, noise, w = _held(teacher)
    sched = NoiseSchedule(ScheduleConfig.from_dict(meta["schedule"]))
    t = torch.arange(len(x0)) % 50 + 1
    ab = torch.from_numpy(sched.alpha_bar).view(-1, 1, 1, 1)[t]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    t_in = (t.float() / 50).view(-1, 1)
    with torch.no_grad():
        target = guided_eps(tmodel, x_t, t_in, c, w)
        cond = tmodel(x_t, t_in, c)
        mine = student(x_t, t_in, c, w)
    err_student = float(((mine - target) ** 2).mean())
    err_cond = float(((cond - target) ** 2).mean())
    assert err_student < 0.5 * err_cond, (err_student, err_cond)
    # w is used, the right way: at w = 1 and at w = 4, the student given that w is closer to
    # the guided target than the student given the other w (a w-blind student is not).
    for right, wrong in ((1.0, 4.0), (4.0, 1.0)):
        with torch.no_grad():
            target = guided_eps(tmodel, x_t, t_in, c, torch.full_like(w, right))
            errs = [
                float(((student(x_t, t_in, c, torch.full_like(w, v)) - target) ** 2).mean())
                for v in (right, wrong)
            ]
        assert errs[0] < 0.8 * errs[1], (right, errs)


# -- stage "steps" --------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_steps_student_matches_two_teacher_steps(teacher, guided, prediction):
    """Stage "steps" 8 -> 4 -> 2 on a guidance student: each round's student lands, in one
    DDIM step, closer to its teacher's two steps than the teacher's own one step does; each
    round is a finished checkpoint recording its timesteps (the runtime's DDIM grid). A v
    student of the eps teacher first learns the teacher's 8 steps (round "steps-8")."""
    out = teacher / f"s-{prediction}"
    cfg = _cfg(teacher, out.name, teacher=str(guided), stage="steps",
               iterations=60, prediction=prediction)  # fmt: skip
    summary = distill(cfg, progress=False)
    counts = [8, 4, 2] if prediction == "v" else [4, 2]
    assert [r["student_steps"] for r in summary["rounds"]] == counts
    x0, c, noise, w = _held(teacher)
    prev, _ = load_teacher(guided)
    for n, n_teacher in zip(counts, [8, *counts], strict=False):
        student, meta = load_model(out / f"steps-{n}")
        sched = NoiseSchedule(ScheduleConfig.from_dict(meta["schedule"]))
        assert meta["distilled_steps"] == spaced_timesteps(sched, n, "time").tolist()
        assert meta["prediction"] == prediction
        assert isinstance(student, EpsFromV) == (prediction == "v")
        assert meta["distilled_sampler"] == {"sampler": "ddim", "steps": n, "eta": 0.0,
                                             "spacing": "time"}  # fmt: skip
        gaps = step_gaps(student, prev, sched, n_teacher, x0, c, w, noise, n)
        if n != n_teacher:
            assert gaps["student"] < 0.75 * gaps["teacher_one"], (n, gaps)
        prev = student
    lines = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    assert [x["student_steps"] for x in lines] == [n for n in counts for _ in range(6)]


# -- resume -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stage,stop,prediction",
    [
        ("guidance", 7, "eps"),
        ("steps", 5, "eps"),
        ("steps", 10, "eps"),  # at a round's end
        ("steps", 13, "v"),  # v: three rounds
        ("steps", 20, "v"),
    ],
)
def test_resume_is_exact(teacher, guided, monkeypatch, stage, stop, prediction):
    """A run (stage "steps": rounds of 10 steps) interrupted 3 steps after its checkpoint at
    ``stop``, then resumed to the end == the run straight: the same bytes in every file
    (metrics.jsonl, the round checkpoints and the state included)."""
    torch.set_num_threads(1)
    kw = dict(stage=stage, iterations=10 if stage == "steps" else 20, checkpoint_every=stop)
    kw["prediction"] = prediction
    if stage == "steps":
        kw.update(teacher=str(guided), start_steps=4, final_steps=1)
    straight, resumed = teacher / f"straight-{stage}-{stop}", teacher / f"resumed-{stage}-{stop}"
    distill(_cfg(teacher, straight.name, **kw), progress=False)

    loss = Distiller.loss

    def interrupted(self):
        if self.step == stop + 3:
            raise KeyboardInterrupt
        return loss(self)

    monkeypatch.setattr(Distiller, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(_cfg(teacher, resumed.name, **kw), progress=False)
    monkeypatch.setattr(Distiller, "loss", loss)
    assert json.loads((resumed / "config.json").read_text())["step"] == stop
    again = DistillConfig(teacher="unused", out=str(resumed), device="cpu")
    rounds = {"guidance": 2, "eps": 2, "v": 3}[stage if stage == "guidance" else prediction]
    assert distill(again, resume=True, progress=False)["steps"] == 10 * rounds
    files = sorted(p.relative_to(straight) for p in straight.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file())
    assert len(files) == 4 + 2 * (rounds if stage == "steps" else 0)
    for f in files:
        a, b = (straight / f).read_bytes(), (resumed / f).read_bytes()
        a = a.replace(straight.name.encode(), b"OUT")  # config.json's "out"
        assert a == b.replace(resumed.name.encode(), b"OUT"), f


def test_config_checks_and_parser(teacher, guided, tmp_path):
    with pytest.raises(InputError, match="stage"):
        DistillConfig(teacher="t", out="o", stage="x").validate()
    with pytest.raises(InputError, match="w-min"):
        DistillConfig(teacher="t", out="o", w_min=3, w_max=2).validate()
    np.savez(tmp_path / "big.npz", **make_shapes(8, size=12, seed=1))
    with pytest.raises(InputError, match="teacher takes"):
        distill(_cfg(teacher, "bad", data=str(tmp_path / "big.npz"), iterations=1))
    two = tmp_path / "two-step"  # as a 2-step student's checkpoint says
    shutil.copytree(guided, two, ignore=shutil.ignore_patterns("*.jsonl", "train_state*"))
    meta = json.loads((two / "config.json").read_text())
    (two / "config.json").write_text(json.dumps({**meta, "distilled_steps": [50, 25]}))
    with pytest.raises(InputError, match="--start-steps 2"):
        distill(_cfg(teacher, "bad2", teacher=str(two), stage="steps"))
    from ddpm_rt.cli import train as cli_train
    from ddpm_rt.training.distill import STAGES
    from ddpm_rt.training.model import PREDICTIONS

    assert (cli_train.DISTILL_STAGES, cli_train.DISTILL_PREDICTIONS) == (STAGES, PREDICTIONS)
    p = argparse.ArgumentParser()
    cli_train._add_distill_parser(p.add_subparsers(), lambda p: None)
    args = p.parse_args(["distill", "T", "--out", "O", "--stage", "steps", "--w-max", "3"])
    names = set(DistillConfig.__dataclass_fields__)
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    assert DistillConfig(**kw) == DistillConfig(teacher="T", out="O", stage="steps", w_max=3.0)
    flags = {a.dest for a in p._subparsers._group_actions[0].choices["distill"]._actions}
    assert names <= flags


def test_v_student_with_w_traces_to_an_eps_graph(tmp_path):
    """What export will trace: a guidance-embedding v student, wrapped (EpsFromV), exports
    to ONNX (4 inputs x, t, c, w; output eps) and ONNX Runtime matches torch."""
    import io

    import onnxruntime as ort

    sched = NoiseSchedule(ScheduleConfig(timesteps=500))
    cfg = UNetConfig(n_feat=8, context_dim=4, height=8, width=8, guidance_embedding=True)
    torch.manual_seed(0)
    net = ContextUnet(cfg).eval()
    with torch.no_grad():  # a trained-like (non-zero) w embedding
        for p in (*net.guidanceembed1.parameters(), *net.guidanceembed2.parameters()):
            p.normal_(0, 0.3)
    model = EpsFromV(net, sched.alpha_bar64).eval()
    ts = np.array([500, 375, 250, 125])
    feeds = {
        "x": np.random.default_rng(0).standard_normal((4, 3, 8, 8), dtype=np.float32),
        "t": (ts / 500).astype(np.float32).reshape(4, 1),
        "c": np.random.default_rng(1).standard_normal((4, 4), dtype=np.float32),
        "w": np.array([[1.0], [2.0], [3.0], [4.0]], dtype=np.float32),
    }
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        args,
        buf,
        dynamo=False,
        opset_version=17,
        input_names=list(feeds),
        output_names=["eps"],
        dynamic_axes={k: {0: "batch"} for k in (*feeds, "eps")},
    )
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(["eps"], feeds)[0]
    with torch.no_grad():
        ref = model(*args).numpy()
        at_one = model(*(a[1:2] for a in args[:3]), torch.ones(1, 1)).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert not np.allclose(ref[1], at_one[0], atol=1e-3)  # w is an input of the graph


def test_cli_distill_runs_both_stages_and_writes_the_round_checkpoints(teacher):
    """``ddpm-rt distill`` (the CLI wiring): stage guidance, then stage steps 8 -> 2 from
    it, each a few iterations; the summary line names the round checkpoints."""
    import subprocess
    import sys

    cli = [sys.executable, "-m", "ddpm_rt.cli", "distill"]
    base = ["--iterations", "2", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    g = subprocess.run(
        [*cli, str(teacher / "teacher"), "--out", str(teacher / "cli-g"), *base],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert g.returncode == 0, g.stderr
    assert "distilled to step 2" in g.stderr
    s = subprocess.run(
        [*cli, str(teacher / "cli-g"), "--out", str(teacher / "cli-s"), "--stage", "steps", *base],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert s.returncode == 0, s.stderr
    for n in (4, 2):
        meta = json.loads((teacher / "cli-s" / f"steps-{n}" / "config.json").read_text())
        assert len(meta["distilled_steps"]) == n and meta["unet"]["guidance_embedding"]
    assert "4 steps:" in s.stderr and "2 steps:" in s.stderr
