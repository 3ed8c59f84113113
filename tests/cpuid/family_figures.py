"""Run in a subprocess on one CPU kernel family (natively, under the CPUID mask, or under
QEMU): the shipped int8 graphs on inputs recorded by the caller, as JSON on stdout.

    python family_figures.py FEEDS.npz [BATCHES]

FEEDS.npz holds x, t, c (stacked feed batches), the fp32 U-Net's eps on them (``ref``) and
``prompts``. Prints this family, the int8 U-Net's parity figures against ``ref`` (the
tolerance table's judgement), and sha256 digests of the int8 U-Net's eps and of the int8
text encoder's contexts: equal digests on two families mean they computed the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from ddpm_rt import Generator
from ddpm_rt.backends import cpu_kernels
from ddpm_rt.parity import compare

DEFAULT = Path(__file__).resolve().parents[2] / "models" / "default"

d = np.load(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else len(d["x"])
gen = Generator(DEFAULT, unet_precision="int8", threads=1)
T = gen.schedule.timesteps
feeds = [{"x": d["x"][i], "t": d["t"][i], "c": d["c"][i]} for i in range(n)]
got = [gen.backend.run(gen.unet_graph, f)["eps"] for f in feeds]
ts = np.concatenate([np.rint(f["t"][:, 0] * T).astype(int) for f in feeds])
ok, figures = compare(("ort", "int8"), got, list(d["ref"][:n]), ts, T)
contexts = np.stack([gen.context(str(p)) for p in d["prompts"]])
print(
    json.dumps(
        {
            "family": cpu_kernels.family(),
            "ok": bool(ok),
            "figures": figures,
            "int8_eps_sha256": hashlib.sha256(np.stack(got).tobytes()).hexdigest(),
            "contexts_sha256": hashlib.sha256(contexts.tobytes()).hexdigest(),
        }
    )
)
