"""Bundles: one self-describing folder holding everything a runtime needs.

``manifest.json`` (schema version 1)::

    {
      "schema_version": 1,
      "image": {"channels": 3, "height": 16, "width": 16},
      "schedule": {"kind": "linear", "timesteps": 500, "beta_start": 1e-4, "beta_end": 0.02},
      "conditioning": {"kind": "label", "context_dim": 12, "label_names": ["red circle", ...]},
      "graphs": {"unet": {"file": "unet.onnx",
                          "inputs": [{"name": "x", "dtype": "float32",
                                      "shape": ["batch", 3, 16, 16]}, ...],
                          "outputs": [...]}},
      "files": {"unet.onnx": {"sha256": "...", "bytes": 123}},
      "producer": {"ddpm_rt": "0.1.0", "torch": "...", "onnx": "...", "opset": 17},
      "source": {...}            # what the bundle was exported from (informational)
    }

:meth:`Bundle.load` checks the schema, that every listed file exists with its sha256, and
that the graph specs agree with the image shape and conditioning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .fileio import sha256_file
from .schedule import ScheduleConfig

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints, or strings naming dynamic axes

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, d: dict) -> GraphSpec:
        return cls(
            d["file"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )


class Bundle:
    """A loaded, validated bundle. Use :meth:`load`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        img = manifest["image"]
        self.image_shape = (int(img["channels"]), int(img["height"]), int(img["width"]))
        self.schedule = ScheduleConfig.from_dict(manifest["schedule"])
        self.conditioning: dict = manifest["conditioning"]
        self.graphs = {k: GraphSpec.from_dict(v) for k, v in manifest["graphs"].items()}

    @property
    def context_dim(self) -> int:
        return int(self.conditioning["context_dim"])

    @property
    def label_names(self) -> list[str]:
        return list(self.conditioning.get("label_names", []))

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise BundleError(f"bundle {self.path} has no graph {name!r}")
        return self.path / self.graphs[name].file

    @classmethod
    def load(cls, path: str | Path, verify_hashes: bool = True) -> Bundle:
        path = Path(path)
        mpath = path / MANIFEST
        if not path.exists():
            raise BundleError(f"bundle not found: {path}")
        if not mpath.is_file():
            raise BundleError(f"not a bundle (no {MANIFEST}): {path}")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"corrupt {mpath}: {e}") from None
        _check_manifest(manifest, mpath)
        if verify_hashes:
            for name, meta in manifest["files"].items():
                f = path / name
                if not f.is_file():
                    raise BundleError(f"bundle file missing: {f}")
                if sha256_file(f) != meta["sha256"]:
                    raise BundleError(
                        f"bundle file {f} does not match its sha256 in {MANIFEST} (corrupt or "
                        "modified; re-export the bundle)"
                    )
        return cls(path, manifest)


def _check_manifest(m: object, mpath: Path) -> None:
    def fail(why: str):
        raise BundleError(f"invalid {mpath}: {why}")

    if not isinstance(m, dict):
        fail("not a JSON object")
    version = m.get("schema_version")
    if not isinstance(version, int):
        fail("no schema_version")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{mpath} has schema version {version}, newer than this ddpm-rt reads "
            f"({SCHEMA_VERSION}); upgrade ddpm-rt"
        )
    for key in ("image", "schedule", "conditioning", "graphs", "files"):
        if not isinstance(m.get(key), dict):
            fail(f"missing or malformed {key!r}")
    try:
        c, h, w = (int(m["image"][k]) for k in ("channels", "height", "width"))
        d = int(m["conditioning"]["context_dim"])
        ScheduleConfig.from_dict(m["schedule"])
        graphs = {k: GraphSpec.from_dict(v) for k, v in m["graphs"].items()}
        for meta in m["files"].values():
            str(meta["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        fail(f"bad field {e}")
    if "unet" not in graphs:
        fail("no 'unet' graph")
    for g in graphs.values():
        if g.file not in m["files"]:
            fail(f"graph file {g.file} is not listed under 'files'")
    cond = m["conditioning"]
    if cond.get("kind") == "text":
        text = cond.get("text")
        # Explicit checks, not asserts: validation must survive ``python -O``.
        try:
            ok = text["tokenizer"] in m["files"] and text["default_precision"] in text["graphs"]
            for gname in text["graphs"].values():
                out = graphs[gname].outputs[0]
                ok = ok and out.name == "embedding" and tuple(out.shape[1:]) == (d,)
            int(text["max_tokens"])
        except (KeyError, TypeError, IndexError, ValueError):
            ok = False
        if not ok:
            fail("malformed text conditioning (tokenizer, text-encoder graphs, dimension)")
    unet = {t.name: t.shape for t in graphs["unet"].inputs}
    expect = {"x": (c, h, w), "t": (1,), "c": (d,)}
    for name, tail in expect.items():
        if name not in unet or tuple(unet[name][1:]) != tail:
            fail(f"unet input {name!r} shape {unet.get(name)} disagrees with image/conditioning")
