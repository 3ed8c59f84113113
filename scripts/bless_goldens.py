"""Write the regression goldens in tests/golden/ (run deliberately, then add a CHANGELOG line).

    python scripts/bless_goldens.py            # all three
    python scripts/bless_goldens.py e2e        # only the seeded end-to-end images

- ``sampler_steps.npz``: each sampler's step on fixed x, eps and *injected* noise (so it
  survives a new noise derivation). Re-bless only when a sampler's formula changes on purpose.
- ``shipped_unet_eps.npz``: the shipped U-Net's eps on fixed inputs, keyed by the graph's
  sha256. Re-bless when the shipped model changes.
- ``e2e_default.npz``: seeded images from the shipped model through ``Generator.generate``,
  with every setting pinned here (:data:`E2E`, :data:`E2E_GENERATOR`: nothing comes from a
  default that may be re-chosen), and the machine that blessed them (:func:`machine`: CPU
  model, instruction set, ONNX Runtime and NumPy versions) stored beside them. On that
  machine the test demands identical bytes; elsewhere the tolerance in
  ``tests/test_goldens.py``. Re-bless when the model, a sampler or the seed -> noise contract
  changes -- never for a change of defaults.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
DEFAULT = ROOT / "models" / "default"

# Every setting of the seeded end-to-end golden, pinned (defaults are re-chosen by the
# evaluation rule and must not move the golden).
E2E = {
    "prompt": "red apple",
    "num": 4,
    "seed": 0,
    "sampler": "ddim",
    "steps": 25,
    "eta": 1.0,
    "guidance": 2.0,
    "spacing": "time",
    "batch_size": 16,
}
E2E_GENERATOR = {
    "backend": "ort",
    "providers": ["CPUExecutionProvider"],
    "unet_precision": "fp32",
    "text_precision": "int8",
    "decoder_precision": "fp32",  # the cascade's decoder (issue 27)
    "threads": 1,
}
# (sampler, steps, eta, spacing, step indices) of the sampler-step golden
SAMPLER_CASES = (
    ("ddpm", None, None, None, (0, 250, 499)),
    ("ddim", 50, 0.0, "time", (0, 25, 49)),
    ("ddim", 50, 1.0, "time", (0, 25, 49)),
)
# CPU features that change which kernels ONNX Runtime and NumPy run (and so the last bits)
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "asimd",
    "sve",
    "sve2",
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
    for name, steps, eta, spacing, indices in SAMPLER_CASES:
        sampler = make_sampler(name, s, steps, eta, spacing)
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

    gen = Generator(DEFAULT, unet_precision="fp32", threads=1)
    x, c, ts = unet_inputs(gen.bundle.context_dim, gen.schedule.timesteps)
    out = {"unet_sha256": np.array(gen.bundle.manifest["files"]["unet.onnx"]["sha256"])}
    for t in ts:
        out[f"t{t}"] = gen.eps(x, t, c)
    return out


def machine() -> dict:
    """What decides the last bits of a run: CPU model and instruction set, ONNX Runtime and
    NumPy versions, architecture, and -- measured, since /proc/cpuinfo is not what the
    libraries see under an emulator or a CPUID mask -- the kernels themselves: the int8
    family (:func:`ddpm_rt.backends.cpu_kernels.family`) and a digest of the shipped fp32
    U-Net's eps on fixed inputs (fp32 kernels differ in their last bits between AVX-512 and
    AVX2, e.g. ONNX Runtime's NCHWc convolution blocks of 16 or 8 channels)."""
    import onnxruntime

    from ddpm_rt.backends import cpu_kernels

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first CPU's lines
    except OSError:
        pass
    cpu = info.get("model name") or info.get("Hardware") or platform.processor()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cpu_flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "kernels": cpu_kernels.family(),
        "fp32_unet_eps_sha256": hashlib.sha256(
            b"".join(v.tobytes() for k, v in sorted(shipped_unet_eps().items()) if k[0] == "t")
        ).hexdigest(),
    }


def e2e() -> dict[str, np.ndarray]:
    from ddpm_rt import Generator

    gen = Generator(DEFAULT, **E2E_GENERATOR)
    kw = {k: v for k, v in E2E.items() if k != "prompt"}
    return {
        "images": gen.generate(E2E["prompt"], **kw),
        "bundle_digest": np.array(gen.bundle.digest),
        "settings": np.array(json.dumps({**E2E, **E2E_GENERATOR}, sort_keys=True)),
        "machine": np.array(json.dumps(machine(), sort_keys=True)),
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
