"""Write the regression goldens in tests/golden/ (run deliberately, then add a CHANGELOG line).

    python scripts/bless_goldens.py            # all three
    python scripts/bless_goldens.py e2e        # only the seeded end-to-end images

- ``sampler_steps.npz``: each sampler's step on fixed x, eps and *injected* noise (so it
  survives a new noise derivation). Re-bless only when a sampler's formula changes on purpose.
- ``shipped_unet_eps.npz``: the shipped U-Net's eps on fixed inputs, keyed by the graph's
  sha256. Re-bless when the shipped model changes.
- ``e2e_default.npz``: seeded images from the shipped model through ``Generator.generate``.
  Re-bless when the model, a sampler or the seed -> noise contract changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
DEFAULT = ROOT / "models" / "default"

# Fixed settings of the seeded end-to-end golden (explicit: defaults may change).
E2E = {"prompt": "red apple", "num": 4, "seed": 0, "sampler": "ddim", "steps": 25}
SAMPLER_CASES = (
    ("ddpm", None, None, (0, 250, 499)),
    ("ddim", 50, 0.0, (0, 25, 49)),
    ("ddim", 50, 1.0, (0, 25, 49)),
)
SHAPE = (2, 3, 16, 16)


class InjectedNoise:
    """Stands in for the sampler's rng: hands out a fixed array whatever is asked."""

    def __init__(self, z: np.ndarray):
        self.z = z
        self.draws = 0

    def standard_normal(self, shape, dtype=np.float32):
        assert tuple(shape) == self.z.shape and dtype == np.float32
        self.draws += 1
        return self.z.copy()


def step_inputs(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(seed))
    return tuple(rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(3))


def sampler_steps() -> dict[str, np.ndarray]:
    from ddpm_rt.core.samplers import make_sampler
    from ddpm_rt.core.schedule import NoiseSchedule

    s = NoiseSchedule()
    out = {}
    for name, steps, eta, indices in SAMPLER_CASES:
        sampler = make_sampler(name, s, steps, eta)
        for i in indices:
            x, eps, z = step_inputs(i)
            out[f"{name}-{steps}-{eta}-{i}"] = sampler.step(x, eps, i, InjectedNoise(z))
    return out


def unet_inputs(context_dim: int, timesteps: int):
    rng = np.random.Generator(np.random.PCG64(2026))
    x = rng.standard_normal((3, 3, 16, 16), dtype=np.float32)
    c = rng.standard_normal((3, context_dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    c[0] = 0.0  # the null context
    ts = (1, timesteps // 2, timesteps)
    return x, c, ts


def shipped_unet_eps() -> dict[str, np.ndarray]:
    from ddpm_rt import Generator

    gen = Generator(DEFAULT)
    x, c, ts = unet_inputs(gen.bundle.context_dim, gen.schedule.timesteps)
    out = {"unet_sha256": np.array(gen.bundle.manifest["files"]["unet.onnx"]["sha256"])}
    for t in ts:
        out[f"t{t}"] = gen.eps(x, t, c)
    return out


def e2e() -> dict[str, np.ndarray]:
    from ddpm_rt import Generator

    gen = Generator(DEFAULT)
    kw = {k: v for k, v in E2E.items() if k != "prompt"}
    return {
        "images": gen.generate(E2E["prompt"], **kw),
        "bundle_digest": np.array(gen.bundle.digest),
    }


def main(argv: list[str]) -> int:
    jobs = {
        "steps": ("sampler_steps.npz", sampler_steps),
        "unet": ("shipped_unet_eps.npz", shipped_unet_eps),
        "e2e": ("e2e_default.npz", e2e),
    }
    for key in argv or list(jobs):
        name, fn = jobs[key]
        np.savez_compressed(GOLDEN / name, **fn())
        print(f"wrote {GOLDEN / name}; add a CHANGELOG line saying why it changed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
