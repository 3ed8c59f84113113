"""A per-user cache of ONNX Runtime's optimised graphs, to shorten the cold start.

Measured on the shipped bundle (2-core x86_64 shared by several jobs, load average ~10,
ONNX Runtime 1.32, one thread, median of 21 alternating runs; sessions created directly):
the U-Net session takes 70 ms from the bundle's graph, 47 ms from its cached optimised form
(6.3 MB) with that form's sha256 checked, 35 ms when the cache trusted a file stamp instead;
the int8 text encoder 178, 162 and 84 ms (33 MB). Under that load sha256 ran at ~480 MB/s,
so checking costs ~90 ms of the ~130 ms the cache saved when it trusted stamps: it still
saves ~40 ms of the cold start, and every byte that runs has been hashed.

The cache lives outside the bundle (bundles may be read-only package data, and are
untrusted): ``$DDPM_RT_CACHE`` or ``$XDG_CACHE_HOME/ddpm-rt`` or ``~/.cache/ddpm-rt``, under
``ort/``. An entry is keyed by the sha256 of the verified ONNX graph, the ONNX Runtime
version, the providers and this CPU (ONNX Runtime's fully optimised graphs may use layouts
specific to the CPU they were made on), and a JSON beside it records how it was made and the
sha256 and size of the optimised graph. Entries are read like a bundle's files (a regular
file, opened without following a link, its size checked against the record before a byte is
read), and any bad entry -- missing record, another key, a FIFO, a link to a device, a size
or hash that does not match -- is a miss that this run rewrites. Every load reads the cached
file once, checks that sha256 and hands those bytes to ONNX Runtime; an entry that fails to
load is ignored and rewritten, and an error from a graph that did come from
the cache names the cached file. (The cache is the user's own
output, like any file they write; the bundle's graph is still verified on every load.)
Only CPU-only sessions are cached. Writes are atomic; a folder that cannot be written just
means no cache. ``DDPM_RT_NO_CACHE=1`` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from pathlib import Path

import onnxruntime as ort

from ddpm_rt.backends import cpu_kernels
from ddpm_rt.bundle.bundle import read_regular
from ddpm_rt.bundle.fileio import atomic_write
from ddpm_rt.bundle.manifest import MAX_FILE_BYTES
from ddpm_rt.errors import DdpmRtError

# An entry's JSON record is a few hundred bytes; anything much larger is not one.
MAX_RECORD = 64 * 1024


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
        # the kernels themselves, measured: /proc/cpuinfo is not what ONNX Runtime sees under
        # an emulator or a CPUID mask, and a graph optimised for AVX-512's layouts fails to
        # run on AVX2 kernels
        "kernels": cpu_kernels.family(),
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return cache_root() / "ort" / f"{key}.onnx", meta


def lookup(graph_sha256: str, providers: list[str]) -> bytes | None:
    """The cached optimised graph's bytes, if its record matches this key and the bytes hash
    to the sha256 recorded when they were written; else None (and a mismatched entry is
    removed, to be written again). The bytes themselves go to ONNX Runtime, never the path:
    what is hashed is what runs. (Inode, size and mtime were trusted once: a graph edited in
    place with its mtime set back, or replaced with its record's stamp rewritten, ran.)
    Hashing costs about 1 ms per 2 MB of graph (see the module docstring)."""
    path, meta = entry(graph_sha256, providers)
    if not os.path.lexists(path.with_suffix(".json")):
        return None  # not cached yet
    try:
        # read like a bundle's files: a regular file (never a FIFO, a device or a link to
        # one), its size checked before a byte is read: the record is small, the graph the
        # size the record gives
        recorded = json.loads(read_regular(path.with_suffix(".json"), None, "", MAX_RECORD))
        if not isinstance(recorded, dict) or recorded.get("key") != meta:
            raise ValueError("another key")
        size = recorded.get("bytes")
        if type(size) is not int or not 0 < size <= MAX_FILE_BYTES:
            raise ValueError("no size")
        data = read_regular(path, size, "")
        if hashlib.sha256(data).hexdigest() != recorded.get("sha256"):
            raise ValueError("changed")
    except (OSError, ValueError, MemoryError, DdpmRtError):  # any bad entry is a miss
        discard(graph_sha256, providers)  # ... rewritten by this run
        return None
    return data


def discard(graph_sha256: str, providers: list[str]) -> None:
    """Remove an entry that failed to load."""
    path, _ = entry(graph_sha256, providers)
    for p in (path, path.with_suffix(".json")):
        with contextlib.suppress(OSError):  # a folder in its place stays: no cache then
            p.unlink(missing_ok=True)


def store(graph_sha256: str, providers: list[str], optimised: Path) -> None:
    """Move a freshly written optimised graph into the cache (best effort)."""
    path, meta = entry(graph_sha256, providers)
    try:
        data = optimised.read_bytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
        record = {"key": meta, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(record).encode()))
    except Exception:  # no cache is never an error
        return
