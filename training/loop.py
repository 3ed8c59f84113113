"""The training loop the trainers share (the U-Net's :mod:`.train`, :mod:`.autoencoder_train`,
:mod:`.upscaler_train`), the device choice and the seeded batch order.

:class:`TrainLoop` runs the steps: the learning rate decaying linearly to 0 over the run,
the optimiser step, a ``{"step", "loss", ...}`` line in ``metrics.jsonl`` every 10 steps
and at the last (the mean loss of the last 10 steps, a window a checkpoint may keep:
``recent_losses``), the progress bar, the checkpoints (every ``checkpoint_every`` steps and
once at the end) and the summary. A trainer gives the per-model pieces: the loss of batch
``self.step``, what it saves and evaluates, and its own summary fields.
:class:`SingleModelLoop` adds the checkpoint the autoencoder and the upscaler share.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import ddpm_rt
from ddpm_rt.errors import CheckpointError, InputError

from .checkpoint import restore_simple_checkpoint, write_simple_checkpoint


def pick_device(name: str) -> torch.device:
    """``--device``: "auto" is CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA GPU is available")
    return torch.device(name)


def batch_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """The rows of step ``step``: epoch e is the permutation ``PCG64([seed, e])`` of the n
    rows, cut into ``max(1, n // batch)`` batches (a short last batch is dropped)."""
    epoch, pos = divmod(step, max(1, n // batch))
    perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)
    idx = perm[pos * batch : (pos + 1) * batch]
    return idx if len(idx) else perm[:batch]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema``'s parameters move ``1 - decay`` of the way to ``model``'s; its buffers (e.g.
    BatchNorm's running statistics, their own EMA) are copied."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p, 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)


class TrainLoop:
    """A trainer's loop. The subclass sets ``cfg`` (with ``lr`` and ``checkpoint_every``),
    ``out``, ``model``'s optimiser ``opt``, ``step`` and ``total_steps``, and gives
    :meth:`loss` and :meth:`save`; the other hooks have defaults."""

    desc = "train"  # the progress bar's label
    rank = 0  # only rank 0 logs and checkpoints (the U-Net trains distributed)
    # A resumed run with no step left reports 0 it/s (the U-Net's summary always has) rather
    # than nan (the single-model trainers').
    zero_rate_when_idle = False

    # -- the per-model pieces -------------------------------------------------------------
    def loss(self) -> torch.Tensor:
        """The loss of batch ``self.step`` (the graph to back-propagate)."""
        raise NotImplementedError

    def after_update(self) -> None:
        """After the optimiser step, before ``step`` counts it (e.g. an EMA update)."""

    def save(self, log=None) -> None:
        """A checkpoint of step ``self.step``; ``log``: the open metrics log, if any."""
        raise NotImplementedError

    def begin(self) -> None:
        """Before the first step, with ``out`` made."""

    def periodic(self, log) -> None:
        """After each step on rank 0: a checkpoint every ``checkpoint_every`` steps but the
        last (:meth:`finish` saves that one)."""
        if self.step % self.cfg.checkpoint_every == 0 and self.step != self.total_steps:
            self.save(log)

    def finish(self, log) -> None:
        """After the last step, on every rank (``log`` is None but on rank 0)."""
        self.save(log)

    def log_fields(self) -> dict:
        """More fields for the loss lines of ``metrics.jsonl``."""
        return {}

    def summary(self) -> dict:
        """More fields for :meth:`fit`'s summary, after :meth:`finish`."""
        return {}

    # -- the loop -------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """The learning rate of step ``self.step``: by default a linear decay from
        ``cfg.lr`` to 0 over ``total_steps``."""
        return self.cfg.lr * (1 - self.step / self.total_steps)

    def train_step(self) -> float:
        """One optimiser step on batch ``self.step`` at :meth:`learning_rate`; returns the
        loss."""
        lr = self.learning_rate()
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.after_update()
        self.step += 1
        value = loss.item()
        # The window of metrics.jsonl's loss mean, kept in the checkpoint (exact resume).
        self.recent_losses = [*getattr(self, "recent_losses", []), value][-10:]
        return value

    def fit(self, progress: bool = True) -> dict:
        """Train from ``self.step`` to ``total_steps``; returns the summary."""
        main = self.rank == 0
        self.out.mkdir(parents=True, exist_ok=True)
        self.begin()
        log = open(self.out / "metrics.jsonl", "a") if main else None
        try:
            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                disable=not (progress and main),
                unit="step",
                desc=self.desc,
                dynamic_ncols=True,
            )
            t0, s0, losses = time.perf_counter(), self.step, []
            try:
                while self.step < self.total_steps:
                    losses.append(self.train_step())
                    bar.update()
                    if not main:
                        continue
                    if self.step % 10 == 0 or self.step == self.total_steps:
                        mean = float(np.mean(self.recent_losses))
                        bar.set_postfix(loss=f"{mean:.4f}")
                        line = {"step": self.step, "loss": mean, **self.log_fields()}
                        log.write(json.dumps(line) + "\n")
                        log.flush()
                    self.periodic(log)
            finally:
                bar.close()
            elapsed = time.perf_counter() - t0
            self.finish(log)
        finally:
            if log is not None:
                log.close()
        ran = self.step - s0
        return {
            "steps": self.step,
            "it_per_s": ran / elapsed
            if elapsed and (ran or self.zero_rate_when_idle)
            else math.nan,
            "final_loss": float(np.mean(losses[-50:])) if losses else math.nan,
            **self.summary(),
        }


class SingleModelLoop(TrainLoop):
    """The loop of a trainer of one model without EMA (the autoencoder, the upscaler): every
    checkpoint evaluates the model (the figures go to ``metrics.jsonl``, ``config.json`` and
    the summary) and writes :func:`.checkpoint.write_simple_checkpoint`'s files. The subclass
    sets ``kind`` (its key in ``config.json``), ``read_config`` and ``shape`` (the model's
    config), and gives :meth:`evaluate` and :meth:`checkpoint_meta`."""

    kind: str
    read_config = None  # folder -> its config.json, checked

    @property
    def shape(self):
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def checkpoint_figures(self) -> dict:
        """What a checkpoint records of the model's quality (default: :meth:`evaluate`)."""
        return self.evaluate()

    def checkpoint_meta(self, ev: dict) -> dict:
        """``config.json`` up to its ``train``, ``step`` and ``producer`` (added here)."""
        raise NotImplementedError

    def save(self, log=None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.last_eval = ev = self.checkpoint_figures()
        if log is not None:
            log.write(json.dumps({"step": self.step, **ev}) + "\n")
            log.flush()
        meta = {
            **self.checkpoint_meta(ev),
            "train": asdict(self.cfg),
            "step": self.step,
            "producer": {"ddpm_rt": ddpm_rt.__version__, "torch": torch.__version__},
        }
        write_simple_checkpoint(self.out, self.model, self.opt, meta)

    def _load_state(self) -> None:
        meta = self.read_config(self.out)
        if type(self.shape).from_dict(meta[self.kind]) != self.shape:
            raise CheckpointError(
                f"the {self.kind} in {self.out} has another shape ({meta[self.kind]}); "
                "use another --out"
            )
        self.step = restore_simple_checkpoint(
            self.out, self.model, self.opt, self.device, int(meta["step"])
        )
