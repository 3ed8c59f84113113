"""The PyTorch way, for side-by-side benchmarks: the project's torch ``ContextUnet`` with a
bundle's weights, the course's DDPM loop, and a script that does what ``ddpm-rt --prompt``
does. Used only by ``ddpm-rt bench`` (lazily; needs the ``train`` and ``export`` extras).

    python -m ddpm_rt.training.torch_reference --bundle models/default --prompt "red apple" \\
        --out apple.png --sampler dpm++2m-sde --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ddpm_rt.core.schedule import NoiseSchedule, ScheduleConfig, timestep_input

from .model import ContextUnet, UNetConfig, load_model


def _module_path(node_name: str) -> str:
    """'/up2/model/model.2/conv1/conv1.1/Mul' -> 'up2.model.2.conv1.1' (TorchScript scopes:
    a segment 'a.b' is child b of the previous segment)."""
    parts = [p for p in node_name.split("/")[1:-1] if p]
    return ".".join(p.rsplit(".", 1)[-1] for p in parts)


def model_from_bundle(bundle_dir: str | Path, checkpoint: str | Path | None = None) -> ContextUnet:
    """The torch U-Net with the bundle's weights: from the checkpoint when given, else mapped
    back from the fp32 ONNX graph's initialisers (GroupNorm's affine weights, which the
    exporter renamed, are found through the scope names of the nodes that use them)."""
    if checkpoint is not None:
        model, _ = load_model(Path(checkpoint))
        return model.eval()
    import onnx
    from onnx import numpy_helper

    from ddpm_rt.bundle.bundle import Bundle

    bundle = Bundle.load(bundle_dir, hash_all=False)
    cfg = bundle.manifest.get("model", {}).get("unet")
    if not isinstance(cfg, dict):
        raise ValueError("the bundle does not record its U-Net config (manifest model.unet)")
    model = ContextUnet(UNetConfig(**cfg)).eval()
    graph = onnx.load_from_string(bundle.graph_bytes("unet")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    renamed = {}
    for node in graph.node:
        for name in node.input:
            if name in inits and name.startswith("onnx::") and node.op_type in ("Mul", "Add"):
                suffix = "weight" if node.op_type == "Mul" else "bias"
                renamed[f"{_module_path(node.name)}.{suffix}"] = inits[name]
    state = {}
    for key, ref in model.state_dict().items():
        arr = inits.get(key, renamed.get(key))
        if arr is None:
            raise ValueError(f"no ONNX initialiser for {key}")
        state[key] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(tuple(ref.shape)))
    model.load_state_dict(state)
    return model


@torch.no_grad()
def eps(model: ContextUnet, x: np.ndarray, t_value: float, c: np.ndarray) -> np.ndarray:
    """The torch model's eps for NumPy inputs (t_value = t / T for every row)."""
    t = torch.full((len(x), 1), float(t_value))
    return model(torch.from_numpy(x), t, torch.from_numpy(c)).numpy()


def compiled(model: ContextUnet):
    return torch.compile(model)


def runner(model, x: np.ndarray, t_value: float, c: np.ndarray):
    """A no-argument function running the model once on these inputs (for timing)."""
    xb, cb = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(c))
    tb = torch.full((len(x), 1), float(t_value))

    def run():
        with torch.no_grad():
            model(xb, tb, cb)

    return run


@torch.no_grad()
def course_ddpm(model: ContextUnet, context, schedule: NoiseSchedule, seed=0):
    """The course's sample_ddpm: all T steps, torch all the way (noise from torch.randn)."""
    if isinstance(context, np.ndarray):
        context = torch.from_numpy(context)
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n, T = len(context), schedule.timesteps
    a, ab, b = (torch.from_numpy(v) for v in (schedule.alpha, schedule.alpha_bar, schedule.beta))
    x = torch.randn(n, cfg.in_channels, cfg.height, cfg.width, generator=g)
    for i in range(T, 0, -1):
        t = torch.full((n, 1), i / T)
        z = torch.randn(x.shape, generator=g) if i > 1 else 0
        eps = model(x, t, context)
        x = (x - eps * ((1 - a[i]) / (1 - ab[i]).sqrt())) / a[i].sqrt() + b[i].sqrt() * z
    return x


def main(argv: list[str] | None = None) -> int:
    """What ``ddpm-rt --prompt`` does, the PyTorch way: torch U-Net, same weights, same
    sampler and noise (NumPy), text encoded by the bundle's encoder through ONNX Runtime."""
    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from ddpm_rt.core.noise import ImageNoise
    from ddpm_rt.core.samplers import make_sampler, sample_loop, to_uint8
    from ddpm_rt.generator import Generator
    from ddpm_rt.images import save_png

    torch.set_num_threads(torch.get_num_threads())
    model = model_from_bundle(args.bundle)
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    schedule = NoiseSchedule(ScheduleConfig(**manifest["schedule"]))
    context = Generator(args.bundle).context(args.prompt)[None]  # text encoder: ORT
    c = torch.from_numpy(context)
    if args.guidance != 1.0:
        c = torch.cat([c, torch.zeros_like(c)])

    @torch.no_grad()
    def eps_fn(x, t):
        xt = torch.from_numpy(x)
        if args.guidance != 1.0:
            xt = torch.cat([xt, xt])
        tt = torch.full((len(xt), 1), timestep_input(t, schedule.timesteps))
        e = model(xt, tt, c)
        if args.guidance != 1.0:
            e = e[1:] + args.guidance * (e[:1] - e[1:])
        return e.numpy()

    sampler = make_sampler(args.sampler, schedule, args.steps)
    img = manifest["image"]
    shape = (1, img["channels"], img["height"], img["width"])
    x = sample_loop(eps_fn, sampler, shape, ImageNoise(args.seed, [0]))
    save_png(args.out, to_uint8(x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
