"""Training checkpoints: write and restore a Trainer's state (weights, EMA, optimiser, step).

Split from :mod:`.train` (the loop) by job. Writes are atomic and ordered so that a crash
leaves the previous checkpoint usable: training state and EMA weights first, the config
(which names the step) last.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save

import ddpm_rt
from ddpm_rt.bundle.fileio import atomic_write
from ddpm_rt.errors import CheckpointError

from .model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, UNetConfig, read_checkpoint_config


def checkpoint_meta(self, extra: dict | None = None) -> dict:  # self: a Trainer
    """A Trainer's ``config.json``; ``extra``: more fields (the distiller's)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "unet": self.unet_config.to_dict(),
        "schedule": self.schedule.config.to_dict(),
        "conditioning": self.data.conditioning,
        # latent data: scale factor, latent shape and the autoencoder (sha256) to decode with
        **({"latent": self.data.latent} if self.data.latent is not None else {}),
        "train": asdict(self.cfg),
        "step": self.step,
        "total_steps": self.total_steps,
        "producer": {"ddpm_rt": ddpm_rt.__version__, "torch": torch.__version__},
        **(extra or {}),
    }


def save_checkpoint(self, extra: dict | None = None) -> None:  # self: a training.train.Trainer
    """Weights, optimiser state and config (:func:`checkpoint_meta`) of a Trainer,
    atomically (config last)."""
    self.out.mkdir(parents=True, exist_ok=True)
    state = {
        f"model.{k}": v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()
    }
    state.update(optimizer_tensors(self.opt))
    if getattr(self, "recent_losses", None):  # the loss window of metrics.jsonl's next line
        state["loop.losses"] = torch.tensor(self.recent_losses, dtype=torch.float64)
    ema = {k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()}
    meta = checkpoint_meta(self, extra)
    # Weights first, config (which names the step) last: a crash leaves the old config.
    atomic_write(self.out / "train_state.safetensors", lambda f: f.write(_st_bytes(state)))
    atomic_write(self.out / "model.safetensors", lambda f: f.write(_st_bytes(ema)))
    atomic_write(self.out / "config.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))


def load_checkpoint(self) -> None:  # self: a training.train.Trainer
    """Restore a Trainer from the checkpoint in its ``out`` folder (exact resume)."""
    meta = read_checkpoint_config(self.out)
    if UNetConfig.from_dict(meta["unet"]) != self.unet_config:
        raise CheckpointError(
            f"checkpoint in {self.out} was trained with a different model or data shape "
            f"({meta['unet']}); use another --out"
        )
    try:
        state = load_file(str(self.out / "train_state.safetensors"))
        ema = load_file(str(self.out / "model.safetensors"))
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint in {self.out}: {e}") from None
    self.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    self.ema.load_state_dict(ema)
    load_optimizer_tensors(self.opt, state, self.device)
    self.recent_losses = state["loop.losses"].tolist() if "loop.losses" in state else []
    self.step = int(meta["step"])
    if self.rank == 0:
        trim_metrics(self.out / "metrics.jsonl", self.step)


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as flat ``opt.<param>.<name>`` tensors."""
    out = {}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            out[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().contiguous().cpu()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, state: dict, device) -> None:
    """Restore what :func:`optimizer_tensors` wrote (other keys in ``state`` are ignored)."""
    opt_state = opt.state_dict()
    for key, v in state.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_state["state"].setdefault(int(i), {})[name] = v.to(device) if name != "step" else v
    opt.load_state_dict(opt_state)


def write_simple_checkpoint(out: Path, model: torch.nn.Module, opt, meta: dict) -> None:
    """A single-model trainer's checkpoint (the autoencoder's, the upscaler's): optimiser
    state and weights first, ``config.json`` (which names the step) last, each atomic."""
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = optimizer_tensors(opt)
    atomic_write(out / "train_state.safetensors", lambda f: f.write(save(state)))
    atomic_write(out / "model.safetensors", lambda f: f.write(save(weights)))
    text = json.dumps(meta, indent=2).encode()
    atomic_write(out / "config.json", lambda f: f.write(text))


def restore_simple_checkpoint(out: Path, model: torch.nn.Module, opt, device, step: int) -> int:
    """Load what :func:`write_simple_checkpoint` wrote into ``model`` and ``opt``; forget the
    metrics logged after ``step``; returns ``step``."""
    try:
        state = load_file(str(out / "train_state.safetensors"))
        model.load_state_dict(load_file(str(out / "model.safetensors")))
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint in {out}: {e}") from None
    load_optimizer_tensors(opt, state, device)
    trim_metrics(out / "metrics.jsonl", step)
    return step


def trim_metrics(log: Path, step: int) -> None:
    """Forget the log lines of steps after the checkpoint (an interrupted run's tail)."""
    if log.is_file():
        keep = [x for x in log.read_text().splitlines() if json.loads(x)["step"] <= step]
        atomic_write(log, lambda f: f.write("".join(x + "\n" for x in keep).encode()))


def _st_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors)


def resume_settings(
    cfg, resume: bool, read_config, overrides: tuple[str, ...] = ("steps", "device")
) -> dict | None:
    """Refuse to overwrite a checkpoint without ``resume`` or to resume nothing; when
    resuming, the stored training settings with those named in ``overrides`` (by default
    ``steps``, which may extend the run, and ``device``) taken from ``cfg`` where given.
    None when not resuming."""
    from ddpm_rt.errors import InputError

    out = Path(cfg.out)
    exists = (out / "config.json").exists()
    if exists and not resume:
        raise InputError(
            f"{out} already holds a checkpoint; pass --resume to continue it or "
            "choose another --out"
        )
    if resume and not exists:
        raise InputError(f"nothing to resume in {out} (no config.json)")
    if not resume:
        return None
    stored = read_config(out)["train"]
    stored.update({k: getattr(cfg, k) for k in overrides if getattr(cfg, k) is not None})
    return stored
