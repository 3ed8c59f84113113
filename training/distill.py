"""``ddpm-rt distill``: fewer U-Net rows per image (issue 29), in two stages.

**Stage "guidance"** (Meng et al., CVPR 2023, stage one). The student is the teacher with
an embedding of the guidance scale w added where the time embedding is
(``UNetConfig.guidance_embedding``; zero-initialised, so the student starts as the
teacher's conditional prediction). Per step: data x0 and a caption's context c, t ~ U{1..T},
eps ~ N(0, I), w ~ U[w_min, w_max], x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps; target = the
teacher's guided prediction eps_u + w (eps_c - eps_u) (its unconditional pass with the null
context, zeros); loss = MSE(student(x_t, t, c, w), target). One call then replaces two.

**Stage "steps"** (Salimans & Ho, ICLR 2022, Algorithm 2; Meng et al. stage two). Rounds
N -> N/2 -> ... -> ``final_steps``, N = ``start_steps``; in each the teacher (the previous
round's student, frozen; round 0: ``teacher``) takes two deterministic DDIM steps (eta 0)
t -> t' -> t'' and the student learns one step t -> t''. The student's steps are exactly the
runtime's ``spaced_timesteps(schedule, N/2, "time")`` (t'' = 0 after the last), so the
runtime's ``ddim`` with ``steps=N/2``, ``eta=0`` takes the steps it was distilled for; t' is
the teacher's own step between them (:func:`step_plan`: the teacher's grid when the student's
grid is every other of its steps, as for T = 500 and N = 16, 8, 4, 2; otherwise the integer
midpoint). Per step: x_t from data at a random student step t, w ~ U[w_min, w_max]; the
target x~0 is the x0 for which one DDIM step t -> t'' lands on the teacher's x_{t''}:
x~0 = (x_{t''} - (sigma_{t''}/sigma_t) x_t) / (alpha_{t''} - (sigma_{t''}/sigma_t) alpha_t);
loss = max(SNR_t, 1) |x^0 - x~0|^2 (the paper's "truncated SNR" weighting), x^0 the student's.
Each round starts the student from the teacher's weights with a fresh optimiser, the
learning rate decaying linearly to 0 within the round; each round's student (its EMA weights)
is written as a finished checkpoint ``OUT/steps-<N/2>`` and is the next round's teacher.

The student of stage "steps" predicts ``prediction`` internally: "eps" (default) or "v"
(v = alpha eps - sigma x0). A v model's checkpoint says ``"prediction": "v"`` and
:func:`~.model.load_model` returns it wrapped in :class:`~.model.EpsFromV` (eps = sigma x +
alpha v, exactly), so what is exported still outputs eps for the runtime's samplers; a v
student of an eps teacher first spends a round learning the teacher's own N steps in v
(``OUT/steps-<N>``). Why eps by default, measured (8x8 shapes, n_feat 16, T = 500, 1000
steps per round, lr 1e-3, batch 32; MSE of the final images to the guidance student's own
8-step DDIM eta 0 from the same noise, w = 2): eps students 0.0053 (4 steps) and 0.044
(2 steps), against the teacher's own 4 and 2 steps 0.011 and 0.134; v students 0.29 and
0.31, their first round's 8-step student already 0.28. The teacher predicts eps: an eps
student starts as its teacher, a v student must re-learn its output (at t = T the teacher's
output is about x, the v target about -x0). The schedule's lowest SNR is 0.0066
(alpha_T = 0.081, not zero): eps stays defined there, its x0 amplified 12x, which the
max(SNR, 1) weighting on x0 already counts (weight 1/SNR on the eps error).

Every checkpoint's ``config.json`` records, beyond ``train``'s fields: ``guidance``
(``{"w_min", "w_max"}``: the scales the student was distilled for; the graph's 4th input),
``prediction``, ``distilled_steps`` (the integer timesteps the sampler must take: null after
stage "guidance", which serves any sampler), ``distilled_sampler`` and ``distill`` (stage,
round, teacher). Resume is exact (the batch order and each step's draws come from
``(seed, step)``, as in ``train``); ``metrics.jsonl`` is ``train``'s, with ``round`` and
``student_steps``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from ddpm_rt.bundle.fileio import atomic_write
from ddpm_rt.core.samplers import spaced_timesteps
from ddpm_rt.core.schedule import NoiseSchedule, ScheduleConfig, timestep_input
from ddpm_rt.errors import InputError

from .checkpoint import checkpoint_meta, load_checkpoint, resume_settings, save_checkpoint
from .data import Dataset, load_dataset
from .loop import TrainLoop, batch_indices, ema_update, pick_device
from .model import (
    PREDICTIONS,
    ContextUnet,
    EpsFromV,
    eps_model,
    load_model,
    read_checkpoint_config,
)

STAGES = ("guidance", "steps")
# Data settings a distillation takes from the teacher's checkpoint when not given.
DATA_FIELDS = (
    "data",
    "labels",
    "contexts",
    "label_names",
    "captions",
    "text_encoder",
    "image_size",
)


@dataclass(frozen=True)
class DistillConfig:
    teacher: str  # a checkpoint folder (train or distill) or a bundle folder
    out: str
    stage: str = "guidance"  # "guidance" | "steps"
    # The training data; None: the teacher checkpoint's (a bundle teacher needs --data).
    data: str | None = None
    labels: str | None = None
    contexts: str | None = None
    label_names: list[str] | None = field(default=None)
    captions: str | None = None
    text_encoder: str | None = None
    image_size: int | None = None
    w_min: float | None = None  # None: the teacher's recorded range, else 1
    w_max: float | None = None  # None: the teacher's recorded range, else 4
    start_steps: int = 8  # stage "steps": the teacher's DDIM steps in the first round
    final_steps: int = 2  # stage "steps": the last round's student steps
    iterations: int = 2000  # optimiser steps per stage ("guidance") or per halving round
    batch_size: int = 64
    lr: float = 1e-4  # per stage/round, decaying linearly to 0
    ema_decay: float = 0.999
    prediction: str = "eps"  # stage "steps": what the student predicts inside ("eps" | "v")
    seed: int = 0
    checkpoint_every: int = 500
    device: str = "auto"

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise InputError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("iterations", "batch_size", "checkpoint_every", "start_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"ema-decay must be in [0, 1), got {self.ema_decay}")
        lo, hi = self.w_min, self.w_max
        if lo is not None and hi is not None and not 0 <= lo <= hi:
            raise InputError(f"need 0 <= w-min <= w-max, got {lo}, {hi}")
        if self.prediction not in PREDICTIONS:
            raise InputError(f"prediction must be one of {', '.join(PREDICTIONS)}")
        if self.stage == "steps":
            halving_rounds(self.start_steps, self.final_steps)


def halving_rounds(start: int, final: int) -> list[int]:
    """The teachers' step counts of stage "steps": start, start/2, ..., 2 * final."""
    if final < 1 or start < 2 * final or start % final or (start // final) & (start // final - 1):
        raise InputError(
            f"start-steps must be final-steps times a power of 2 (>= 2), got {start} and {final}"
        )
    rounds = [start]
    while rounds[-1] // 2 > final:
        rounds.append(rounds[-1] // 2)
    return rounds


def step_plan(schedule: NoiseSchedule, teacher_steps: int, student_steps: int | None = None):
    """(S, 3) integer timesteps (t, t', t'') of a round: the student's step t -> t''
    (``spaced_timesteps(schedule, S)``, S = ``student_steps``, default N/2; t'' = 0 after the
    last) and the teacher's intermediate t'. t' is the teacher's own step
    (``spaced_timesteps(schedule, N)[2k+1]``) when the student's grid is every other step of
    the teacher's; otherwise the integer midpoint of t and t'' (the teacher then steps off its
    N-step grid; never for T = 500). S = N (the "v" student's first round, which learns the
    teacher's own steps): t' = t'', the teacher's second step is the identity."""
    n = teacher_steps // 2 if student_steps is None else student_steps
    student = spaced_timesteps(schedule, n, "time")
    end = np.append(student[1:], 0)
    if n == teacher_steps:
        return np.stack([student, end, end], axis=1).astype(np.int64)
    teacher = spaced_timesteps(schedule, teacher_steps, "time")
    if n * 2 != teacher_steps:
        raise InputError(f"a round halves the steps: {teacher_steps} -> {n}")
    if np.array_equal(teacher[::2], student):
        mid = teacher[1::2]
    else:
        mid = (student + end) // 2
    if not np.all((student > mid) & (mid > end)):
        raise InputError(f"{teacher_steps} teacher steps leave no room between student steps")
    return np.stack([student, mid, end], axis=1).astype(np.int64)


def raw_net(model: torch.nn.Module) -> ContextUnet:
    """The ContextUnet inside an eps wrapper (or the model itself)."""
    return model.net if isinstance(model, EpsFromV) else model


def load_teacher(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(eps model, checkpoint-like meta) from a checkpoint folder or a bundle folder (whose
    U-Net weights are mapped back from its fp32 ONNX graph)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        from .torch_reference import model_from_bundle

        manifest = json.loads((path / "manifest.json").read_text())
        meta = {k: manifest[k] for k in ("schedule", "conditioning", "latent") if k in manifest}
        meta["unet"] = manifest["model"]["unet"]
        return model_from_bundle(path).eval(), meta
    return load_model(path)


@torch.no_grad()
def guided_eps(model, x, t_in, c, w) -> torch.Tensor:
    """A model's classifier-free guided eps at scales w (B, 1): one call with w for a
    guidance-embedding model, else eps_u + w (eps_c - eps_u) with the null (zero) context,
    both rows in one call."""
    if raw_net(model).config.guidance_embedding:
        return model(x, t_in, c, w)
    e = model(torch.cat([x, x]), torch.cat([t_in, t_in]), torch.cat([c, torch.zeros_like(c)]))
    eps_c, eps_u = e.chunk(2)
    return eps_u + w.view(-1, 1, 1, 1) * (eps_c - eps_u)


class Distiller(TrainLoop):
    """One distillation run (a stage, all its rounds) on TrainLoop's skeleton."""

    desc = "distill"
    zero_rate_when_idle = True

    def __init__(self, cfg: DistillConfig, data: Dataset, teacher, meta: dict, resume=False):
        cfg.validate()
        self.cfg, self.data, self.meta = cfg, data, meta
        self.out = Path(cfg.out)
        self.device = pick_device(cfg.device)
        t_net = raw_net(teacher)
        tc = t_net.config
        if (tc.height, tc.width) != data.image_size or tc.in_channels != data.channels:
            raise InputError(
                f"the teacher takes {tc.in_channels}x{tc.height}x{tc.width}, the data is "
                f"{data.channels}x{data.image_size[0]}x{data.image_size[1]}"
            )
        if tc.context_dim != data.context_dim:
            raise InputError(f"teacher context_dim {tc.context_dim}, data's {data.context_dim}")
        self.schedule = NoiseSchedule(ScheduleConfig.from_dict(meta["schedule"]))
        T = self.schedule.timesteps
        ab = torch.from_numpy(self.schedule.alpha_bar64)
        self.alpha = ab.sqrt().float().to(self.device)  # indexed by t = 0..T
        self.sigma = (1 - ab).sqrt().float().to(self.device)
        recorded = meta.get("guidance") if isinstance(meta.get("guidance"), dict) else {}
        self.w_min = cfg.w_min if cfg.w_min is not None else recorded.get("w_min", 1.0)
        self.w_max = cfg.w_max if cfg.w_max is not None else recorded.get("w_max", 4.0)
        if not 0 <= self.w_min <= self.w_max:
            raise InputError(f"need 0 <= w-min <= w-max, got {self.w_min}, {self.w_max}")
        if cfg.stage == "guidance":
            self.prediction = "eps"
            self.rounds: list[tuple[int, int] | None] = [None]
        else:
            self.prediction = cfg.prediction
            done = meta.get("distilled_steps")
            if done is not None and len(done) != cfg.start_steps:
                raise InputError(
                    f"the teacher was distilled for {len(done)} steps: give --start-steps "
                    f"{len(done)}"
                )
            # (teacher steps, student steps) per round; a v student of an eps teacher first
            # learns the teacher's own steps (same count) in its new parametrisation.
            self.rounds = [(n, n // 2) for n in halving_rounds(cfg.start_steps, cfg.final_steps)]
            if self.prediction != meta.get("prediction", "eps"):
                self.rounds.insert(0, (cfg.start_steps, cfg.start_steps))
            self.plans = [torch.from_numpy(step_plan(self.schedule, *r)) for r in self.rounds]
        self.unet_config = replace(tc, guidance_embedding=True)
        torch.manual_seed(cfg.seed)  # the guidance embedding's first layers
        self.model = ContextUnet(self.unet_config)
        missing, unexpected = self.model.load_state_dict(t_net.state_dict(), strict=False)
        if unexpected or any(not k.startswith("guidanceembed") for k in missing):
            raise InputError(f"the teacher's weights do not fit the student: {missing, unexpected}")
        self.model.to(self.device)
        self.student = eps_model(self.model, self.prediction, self.schedule.alpha_bar64)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.first_teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.teacher, self.round = None, None
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.total_steps = cfg.iterations * len(self.rounds)
        self.step = 0
        self.timesteps = T
        self.images = torch.from_numpy(data.images).to(self.device)
        self.table = torch.from_numpy(data.table).to(self.device)
        self.choices = torch.from_numpy(data.choices).to(self.device)
        self.num_choices = torch.from_numpy(data.num_choices).to(self.device)
        if resume:
            load_checkpoint(self)

    # -- rounds ---------------------------------------------------------------------------
    def round_of(self, step: int) -> int:
        """The round step ``step`` (0-based, the next one taken) belongs to."""
        return min(step // self.cfg.iterations, len(self.rounds) - 1)

    def student_steps(self, r: int) -> int | None:
        return None if self.rounds[r] is None else self.rounds[r][1]

    def round_dir(self, r: int) -> Path:
        return self.out / f"steps-{self.student_steps(r)}"

    def _prepare_round(self) -> None:
        """Before a step: the teacher of its round; at a round's first step (but the
        first round's), the student restarts from its EMA weights (the new teacher's) with
        a fresh optimiser state."""
        r = self.round_of(self.step)
        if r == self.round:
            return
        if self.step == r * self.cfg.iterations and r > 0:
            self.model.load_state_dict(self.ema.state_dict())
            self.opt.state.clear()
        if r == 0:
            self.teacher = self.first_teacher
        else:
            teacher, _ = load_model(self.round_dir(r - 1))
            self.teacher = teacher.to(self.device).requires_grad_(False)
        self.round = r

    def learning_rate(self) -> float:
        k = self.step - self.round_of(self.step) * self.cfg.iterations
        return self.cfg.lr * (1 - k / self.cfg.iterations)

    def train_step(self) -> float:
        self._prepare_round()
        return super().train_step()

    # -- one step -------------------------------------------------------------------------
    def _batch(self, gen: torch.Generator):
        idx = batch_indices(self.cfg.seed, self.step, len(self.data), self.cfg.batch_size)
        idx = torch.from_numpy(idx).to(self.device)
        if self.data.latent is not None:
            x0 = self.images[idx]
        else:
            x0 = self.images[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        b = x0.shape[0]
        pick = (torch.rand(b, generator=gen, device=self.device) * self.num_choices[idx]).long()
        c = self.table[self.choices[idx, pick]]
        u = torch.rand(b, 1, generator=gen, device=self.device)
        w = self.w_min + (self.w_max - self.w_min) * u
        eps = torch.randn(x0.shape, generator=gen, device=self.device)
        return x0, c, w, eps

    def _t_in(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_input(t.float(), self.timesteps).view(-1, 1)

    def _coef(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table[t].view(-1, 1, 1, 1)

    def ddim_step(self, x, eps, t, t_next) -> torch.Tensor:
        """Deterministic DDIM (eta 0) from t to t_next, the runtime's formula."""
        a, s = self._coef(self.alpha, t), self._coef(self.sigma, t)
        x0 = (x - s * eps) / a
        return self._coef(self.alpha, t_next) * x0 + self._coef(self.sigma, t_next) * eps

    def loss(self) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1_000_003 + self.step)
        x0, c, w, eps = self._batch(gen)
        b = x0.shape[0]
        if self.rounds[self.round] is None:  # stage "guidance"
            t = torch.randint(1, self.timesteps + 1, (b,), generator=gen, device=self.device)
            x_t = self._coef(self.alpha, t) * x0 + self._coef(self.sigma, t) * eps
            target = guided_eps(self.teacher, x_t, self._t_in(t), c, w)
            pred = self.student(x_t, self._t_in(t), c, w)
            return torch.nn.functional.mse_loss(pred, target)
        plan = self.plans[self.round].to(self.device)
        k = torch.randint(0, len(plan), (b,), generator=gen, device=self.device)
        t, t_mid, t_end = plan[k].unbind(1)
        x_t = self._coef(self.alpha, t) * x0 + self._coef(self.sigma, t) * eps
        with torch.no_grad():
            e1 = guided_eps(self.teacher, x_t, self._t_in(t), c, w)
            x_mid = self.ddim_step(x_t, e1, t, t_mid)
            e2 = guided_eps(self.teacher, x_mid, self._t_in(t_mid), c, w)
            x_end = self.ddim_step(x_mid, e2, t_mid, t_end)
            ratio = self._coef(self.sigma, t_end) / self._coef(self.sigma, t)
            a_t, a_end = self._coef(self.alpha, t), self._coef(self.alpha, t_end)
            target = (x_end - ratio * x_t) / (a_end - ratio * a_t)
        pred_eps = self.student(x_t, self._t_in(t), c, w)
        pred_x0 = (x_t - self._coef(self.sigma, t) * pred_eps) / a_t
        snr = (a_t / self._coef(self.sigma, t)) ** 2
        return (snr.clamp(min=1.0) * (pred_x0 - target) ** 2).mean()

    def after_update(self) -> None:
        k = self.step - self.round * self.cfg.iterations  # EMA warm-up restarts each round
        ema_update(self.ema, self.model, min(self.cfg.ema_decay, (1 + k) / (10 + k)))

    # -- checkpoints ----------------------------------------------------------------------
    def log_fields(self) -> dict:
        r = self.round_of(self.step - 1)
        return {"round": r, "student_steps": self.student_steps(r)}

    def extra_meta(self, r: int) -> dict:
        n = self.student_steps(r)
        steps = None if n is None else spaced_timesteps(self.schedule, n, "time").tolist()
        return {
            "guidance": {"w_min": self.w_min, "w_max": self.w_max},
            "prediction": self.prediction,
            "distilled_steps": steps,
            "distilled_sampler": None
            if n is None
            else {"sampler": "ddim", "steps": n, "eta": 0.0, "spacing": "time"},
            "distill": {"stage": self.cfg.stage, "round": r, "teacher": self.cfg.teacher},
        }

    def save(self, log=None) -> None:
        save_checkpoint(self, self.extra_meta(self.round_of(max(self.step - 1, 0))))

    def save_round(self, r: int) -> None:
        """Round r's student (EMA weights) as a finished checkpoint ``steps-<N>``: the
        next round's teacher and a checkpoint ``ddpm-rt export`` takes."""
        folder = self.round_dir(r)
        folder.mkdir(parents=True, exist_ok=True)
        ema = {k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()}
        text = json.dumps(checkpoint_meta(self, self.extra_meta(r)), indent=2).encode()
        atomic_write(folder / "model.safetensors", lambda f: f.write(save(ema)))
        atomic_write(folder / "config.json", lambda f: f.write(text))

    def periodic(self, log) -> None:
        end_of_round = self.step % self.cfg.iterations == 0
        if end_of_round and self.rounds[0] is not None and self.step != self.total_steps:
            self.save_round(self.round_of(self.step - 1))  # before the checkpoint naming it
        if self.step % self.cfg.checkpoint_every == 0 or end_of_round:
            if self.step != self.total_steps:
                self.save()

    def finish(self, log) -> None:
        if self.rounds[0] is not None and self.step:
            self.save_round(self.round_of(self.step - 1))
        self.save()


def _data_settings(cfg: DistillConfig, meta: dict) -> DistillConfig:
    """``cfg`` with the data settings it leaves unset taken from the teacher's checkpoint."""
    stored = meta.get("train") or {}
    if cfg.data is not None or not stored.get("data"):
        if cfg.data is None:
            raise InputError(f"{cfg.teacher} records no training data: give --data")
        return cfg
    return replace(cfg, **{k: stored.get(k) for k in DATA_FIELDS})


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> dict:
    """Distil ``cfg.teacher`` into ``cfg.out`` (or resume that run); returns a summary."""
    out = Path(cfg.out)
    stored = resume_settings(cfg, resume, read_checkpoint_config, overrides=("device",))
    if stored is not None:
        cfg = DistillConfig(**stored)
    cfg.validate()
    teacher, meta = load_teacher(cfg.teacher)
    cfg = _data_settings(cfg, meta)
    data = load_dataset(
        *(getattr(cfg, k) for k in DATA_FIELDS), cache=out / "caption_embeddings.npz"
    )
    d = Distiller(cfg, data, teacher, meta, resume=resume)
    summary = d.fit(progress=progress)
    summary["out"] = str(out)
    summary["rounds"] = [
        {"student_steps": d.student_steps(r), "checkpoint": str(d.round_dir(r))}
        for r in range(len(d.rounds))
        if d.rounds[r] is not None
    ]
    return summary


@torch.no_grad()
def step_gaps(
    student,
    teacher,
    schedule: NoiseSchedule,
    teacher_steps: int,
    x0,
    c,
    w,
    noise,
    student_steps=None,
):
    """How far one student step lands from two teacher steps (the round N = ``teacher_steps``
    -> ``student_steps``, default N/2, of :func:`step_plan`): for each row, x_t (t the
    student's step k = row % S) from ``x0`` and ``noise``; the mean squared distance in x at
    t'' of the student's one DDIM step (eta 0) and of the teacher's own one step from the
    teacher's two. Returns ``{"student", "teacher_one"}``."""
    plan = torch.from_numpy(step_plan(schedule, teacher_steps, student_steps))
    ab = torch.from_numpy(schedule.alpha_bar64)
    alpha, sigma = ab.sqrt().float(), (1 - ab).sqrt().float()
    T = schedule.timesteps
    t, t_mid, t_end = plan[torch.arange(len(x0)) % len(plan)].unbind(1)

    def co(table, s):
        return table[s].view(-1, 1, 1, 1)

    def ddim(x, e, s, s_next):
        return co(alpha, s_next) * (x - co(sigma, s) * e) / co(alpha, s) + co(sigma, s_next) * e

    def tin(s):
        return timestep_input(s.float(), T).view(-1, 1)

    x_t = co(alpha, t) * x0 + co(sigma, t) * noise
    e1 = guided_eps(teacher, x_t, tin(t), c, w)
    x_mid = ddim(x_t, e1, t, t_mid)
    two = ddim(x_mid, guided_eps(teacher, x_mid, tin(t_mid), c, w), t_mid, t_end)
    one = ddim(x_t, e1, t, t_end)
    mine = ddim(x_t, guided_eps(student, x_t, tin(t), c, w), t, t_end)
    return {
        "student": float(((mine - two) ** 2).mean()),
        "teacher_one": float(((one - two) ** 2).mean()),
    }


__all__ = [
    "DistillConfig",
    "Distiller",
    "distill",
    "guided_eps",
    "halving_rounds",
    "load_teacher",
    "step_gaps",
    "step_plan",
]
