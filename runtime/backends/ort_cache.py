"""A per-user cache of ONNX Runtime's optimised graphs, to shorten the cold start.

Measured on the shipped bundle (2-core x86_64, ONNX Runtime 1.32, median of 5, another job
running): creating the U-Net session takes 39 ms from the bundle's graph and 16 ms from its
cached optimised form; the int8 text encoder 103 ms and 44 ms -- about 80 ms of a ~0.4 s
cold start, less the ~25 ms of hashing the bundle's graphs, which is done either way.

The cache lives outside the bundle (bundles may be read-only package data, and are
untrusted): ``$DDPM_RT_CACHE`` or ``$XDG_CACHE_HOME/ddpm-rt`` or ``~/.cache/ddpm-rt``, under
``ort/``. An entry is keyed by the sha256 of the verified ONNX graph, the ONNX Runtime
version, the providers and this CPU (ONNX Runtime's fully optimised graphs may use layouts
specific to the CPU they were made on), and a JSON beside it records how it was made and the
sha256, inode, size and mtime of the optimised graph; an entry whose file changed since it
was written, or that fails to load, is ignored and rewritten. (The cache is the user's own
output, like any file they write; the bundle's graph is still verified on every load.)
Only CPU-only sessions are cached. Writes are atomic; a folder that cannot be written just
means no cache. ``DDPM_RT_NO_CACHE=1`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import onnxruntime as ort

from ddpm_rt.bundle.fileio import atomic_write


def enabled() -> bool:
    """Off with ``DDPM_RT_NO_CACHE=1``."""
    return os.environ.get("DDPM_RT_NO_CACHE", "") in ("", "0")


def cache_root() -> Path:
    if os.environ.get("DDPM_RT_CACHE"):
        return Path(os.environ["DDPM_RT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpm-rt"


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        return f"{model.split(':')[-1].strip()} {hashlib.sha256(flags.encode()).hexdigest()[:16]}"
    except (OSError, StopIteration):
        return f"{platform.machine()} {platform.processor()}"


def entry(graph_sha256: str, providers: list[str]) -> tuple[Path, dict]:
    meta = {
        "graph_sha256": graph_sha256,
        "onnxruntime": ort.__version__,
        "providers": list(providers),
        "cpu": _cpu(),
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return cache_root() / "ort" / f"{key}.onnx", meta


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def lookup(graph_sha256: str, providers: list[str]) -> str | None:
    """The cached optimised graph's path, if present and unchanged since it was written
    (inode, size and mtime as recorded: hashing it again would cost what the cache saves)."""
    path, meta = entry(graph_sha256, providers)
    try:
        recorded = json.loads(path.with_suffix(".json").read_text())
        if recorded.get("key") != meta or recorded.get("stamp") != _stamp(path):
            return None
    except (OSError, ValueError):
        return None
    return str(path)


def discard(graph_sha256: str, providers: list[str]) -> None:
    """Remove an entry that failed to load."""
    path, _ = entry(graph_sha256, providers)
    for p in (path, path.with_suffix(".json")):
        p.unlink(missing_ok=True)


def store(graph_sha256: str, providers: list[str], optimised: Path) -> None:
    """Move a freshly written optimised graph into the cache (best effort)."""
    path, meta = entry(graph_sha256, providers)
    try:
        data = optimised.read_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
        record = {
            "key": meta,
            "sha256": hashlib.sha256(data).hexdigest(),
            "stamp": _stamp(path),
        }
        atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(record).encode()))
    except Exception:  # no cache is never an error
        return
