"""docs/bundle-format.md is the spec: the shipped bundle is read against its field table,
and its noise derivation, re-implemented from the page's text, gives the runtime's noise."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPEC = (ROOT / "docs" / "bundle-format.md").read_text()
SHIPPED = json.loads((ROOT / "models" / "default" / "manifest.json").read_text())
# keys that are names chosen by the bundle, written as * in the table
WILDCARD_PARENTS = {
    "graphs",
    "files",
    "conditioning.text.graphs",
    "unet_precisions",
    "conditioning.text.checks",
    "latent.decoder.graphs",
    "latent.decoder.variants",
}
TYPES = {"int": int, "number": (int, float), "string": str, "object": dict}


def _table() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in SPEC.splitlines():
        m = re.match(r"\| `([^`]+)` \| ([^|]+) \| ([^|]+) \|", line)
        if m:
            rows[m[1]] = (m[2].strip(), m[3].strip())
    return rows


def _paths(obj, prefix=""):
    for key, value in obj.items():
        name = "*" if prefix.rstrip(".") in WILDCARD_PARENTS else key
        path = f"{prefix}{name}"
        yield path, value
        if (
            isinstance(value, dict)
            and path not in ("producer", "source", "model", "parity", "latent.upscaler")
            and not path.startswith(
                ("unet_precisions.*", "graphs.*.", "latent.decoder.variants.*")
            )
        ):
            yield from _paths(value, path + ".")


def _ok_type(kind: str, value) -> bool:
    if " or " in kind:
        return any(_ok_type(k, value) for k in kind.split(" or "))
    if kind.startswith("list"):
        return isinstance(value, list)
    want = TYPES[kind]
    return isinstance(value, want) and not isinstance(value, bool)


def test_every_shipped_field_is_specified_with_its_type():
    table = _table()
    assert len(table) > 30
    for path, value in _paths(SHIPPED):
        assert path in table, f"{path} is not in docs/bundle-format.md"
        kind, _ = table[path]
        assert _ok_type(kind, value), (path, kind, value)


def test_every_required_field_is_present():
    present = {p for p, _ in _paths(SHIPPED)}
    for path, (_, required) in _table().items():
        if required == "yes":
            assert path in present, path
        if required == "text only" and SHIPPED["conditioning"]["kind"] == "text":
            assert path in present, path


def test_noise_from_the_spec_text_alone():
    """Philox4x64-10 + Box-Muller as the page states them (constants read from its text)."""
    from ddpm_rt.core.noise import ImageNoise

    m0, m1, w0, w1 = (int(h, 16) for h in re.findall(r"0x[0-9A-F]{16}", SPEC)[:4])
    mask = 2**64 - 1

    def philox(counter, key):
        c0, c1, c2, c3 = counter
        k0, k1 = key
        for _ in range(10):
            p0, p1 = m0 * c0, m1 * c2
            c0, c1, c2, c3 = (p1 >> 64) ^ c1 ^ k0, p1 & mask, (p0 >> 64) ^ c3 ^ k1, p0 & mask
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
        return [c0, c1, c2, c3]

    def normals(seed, i, n):
        words, b = [], 1
        while len(words) < n:
            words += philox((b, 0, 0, 0), (seed, i))
            b += 1
        out = []
        for a, c in zip(words[0:n:2], words[1:n:2], strict=True):
            r = math.sqrt(-2.0 * math.log(((a >> 11) + 1) * 2.0**-53))
            theta = 2 * math.pi * ((c >> 11) * 2.0**-53)
            out += [r * math.cos(theta), r * math.sin(theta)]
        return np.array(out, dtype=np.float32)

    seed = 2**40 + 17
    noise = ImageNoise(seed, [5, 0])
    first, second = noise.standard_normal((2, 3, 4, 4)), noise.standard_normal((2, 3, 4, 4))
    for row, i in enumerate([5, 0]):  # draws follow one another on each image's stream
        stream = normals(seed, i, 96)
        np.testing.assert_array_equal(first[row].ravel(), stream[:48])
        np.testing.assert_array_equal(second[row].ravel(), stream[48:])
    z = ImageNoise(0, range(64)).standard_normal((64, 3, 16, 16))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
