"""Replace a bundle's int8 text encoder with the one in a ``ddpm-rt text export`` folder.

    python scripts/swap_text_encoder.py models/default runs/minilm

A maintainer's tool for a re-quantised encoder (same fp32 model, same tokenizer): the
graph file, its sha256 and size, and the encoder's recorded checks are replaced; the
tokenizer must be byte-identical (a different one would change every prompt's tokens, which
needs a re-export from the checkpoint). The new manifest is validated before anything is
written, and the bundle is loaded and fully hashed afterwards.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

from ddpm_rt.bundle.bundle import MANIFEST, Bundle
from ddpm_rt.bundle.fileio import atomic_write
from ddpm_rt.bundle.manifest import validate_manifest
from ddpm_rt.text import TEXT_MANIFEST


def swap(bundle_dir: Path, text_dir: Path) -> None:
    bundle = Bundle.load(bundle_dir, hash_all=True)
    text = json.loads((text_dir / TEXT_MANIFEST).read_text())
    m = copy.deepcopy(bundle.manifest)
    cond = m["conditioning"]["text"]
    tok = (text_dir / text["tokenizer"]).read_bytes()
    if tok != (bundle.path / cond["tokenizer"]).read_bytes():
        sys.exit("error: the tokenizer differs: re-export the bundle from its checkpoint")
    graph = m["graphs"][cond["graphs"]["int8"]]
    data = (text_dir / text["graphs"]["int8"]["file"]).read_bytes()
    m["files"][graph["file"]] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    cond["checks"] = text["checks"]
    validate_manifest(m)
    atomic_write(bundle.path / graph["file"], lambda f: f.write(data))
    text_out = (json.dumps(m, indent=2, allow_nan=False) + "\n").encode()
    atomic_write(bundle.path / MANIFEST, lambda f: f.write(text_out))
    Bundle.load(bundle.path, hash_all=True)
    print(f"{bundle.path}: {graph['file']} replaced ({len(data) / 1e6:.1f} MB)")
    print(f"checks: {cond['checks']}")


if __name__ == "__main__":
    swap(Path(sys.argv[1]), Path(sys.argv[2]))
