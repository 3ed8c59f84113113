"""The per-user cache of TensorRT engines: keys, paths, records, atomic writes, locks.

TensorRT engines are executable artefacts tied to one TensorRT version and one GPU model, so
they are built on the user's machine only (``ddpm-rt build-engines``) and never read from a
bundle or from a path a bundle names. Layout, under ``--engine-cache`` (default
``<user cache>/ddpm-rt/engines``, see :func:`ddpm_rt.backends.ort_cache.cache_root`)::

    <TensorRT version>/<GPU name>-sm<major><minor>/<key>.plan   the serialised engine
    <TensorRT version>/<GPU name>-sm<major><minor>/<key>.json   how it was built (EngineRecord)
    <TensorRT version>/<GPU name>-sm<major><minor>/<key>.lock   held while it is built
    <TensorRT version>/<GPU name>-sm<major><minor>/timing.cache TensorRT's timing cache

The timing cache sits beside the engines of one GPU: TensorRT refuses a timing cache made on
another device (``IBuilderConfig.set_timing_cache`` returns False, pyCoreDoc.h at v10.3.0
lines 1490-1502), so one file shared by every GPU would be rejected on all but one.

``key`` is the sha256 of the verified ONNX graph's sha256 and the build flags (precision,
profile shapes, optimisation level, workspace), so a different graph or different flags
never reuse an engine. Writes go to a temp file renamed into place; builders of the same
engine take an exclusive ``flock`` on ``<key>.lock`` and the second one finds the engine the
first one built. Nothing here imports TensorRT: it is all testable without a GPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ddpm_rt.bundle.fileio import atomic_write
from ddpm_rt.errors import BackendError, InputError

RECORD_FORMAT = "ddpm-rt-engine"
TIMING_CACHE = "timing.cache"
RECORD_VERSION = 1


def default_root() -> Path:
    from ddpm_rt.backends.ort_cache import cache_root

    return cache_root() / "engines"


def gpu_slug(name: str, compute_capability: tuple[int, int]) -> str:
    """'NVIDIA H200', (9, 0) -> 'nvidia-h200-sm90' (a folder name)."""
    clean = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    return f"{clean}-sm{compute_capability[0]}{compute_capability[1]}"


@dataclass(frozen=True)
class BuildFlags:
    """Everything besides the ONNX graph that decides what engine TensorRT builds."""

    precision: str  # the U-Net's or decoder's precision (the graph carries it: strongly typed)
    profile: dict  # input name -> [min, opt, max] shapes
    optimization_level: int = 3  # TensorRT's default
    workspace_mib: int = 1024
    strongly_typed: bool = True

    def canonical(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def engine_key(onnx_sha256: str, flags: BuildFlags) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", onnx_sha256):
        raise InputError(f"not a sha256: {onnx_sha256!r:.80}")
    return hashlib.sha256(f"{onnx_sha256}\n{flags.canonical()}".encode()).hexdigest()


@dataclass(frozen=True)
class EngineRecord:
    """The JSON written beside each engine: what it was built from and for."""

    graph: str  # the bundle's graph name (unet, unet_fp16, unet_int8_qdq, decoder, ...)
    onnx_sha256: str
    flags: BuildFlags
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    plan_sha256: str = ""
    plan_bytes: int = 0
    build_seconds: float = 0.0
    ddpm_rt_version: str = ""

    @property
    def key(self) -> str:
        return engine_key(self.onnx_sha256, self.flags)

    def to_json(self) -> str:
        d = asdict(self)
        d["compute_capability"] = list(self.compute_capability)
        return json.dumps({"format": RECORD_FORMAT, "version": RECORD_VERSION, **d}, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> EngineRecord:
        try:
            d = json.loads(text)
            if d.pop("format", None) != RECORD_FORMAT or d.pop("version", 0) > RECORD_VERSION:
                raise ValueError("not a ddpm-rt engine record of a version this runtime reads")
            d["flags"] = BuildFlags(**d["flags"])
            d["compute_capability"] = tuple(int(v) for v in d["compute_capability"])
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise BackendError(f"damaged engine record {where}: {e}") from None


@dataclass(frozen=True)
class Platform:
    """What an engine must match at load time."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]


def mismatch(record: EngineRecord, here: Platform, onnx_sha256: str) -> str | None:
    """Why an engine built as ``record`` cannot run here on this graph (None when it can),
    as one line that says what to rebuild."""
    rebuild = "rebuild it with 'ddpm-rt build-engines BUNDLE'"
    if record.onnx_sha256 != onnx_sha256:
        return (
            f"the engine for {record.graph} was built from another ONNX graph "
            f"(sha256 {record.onnx_sha256[:12]}…, the bundle's is {onnx_sha256[:12]}…); {rebuild}"
        )
    if record.tensorrt_version != here.tensorrt_version:
        return (
            f"the engine for {record.graph} was built with TensorRT {record.tensorrt_version}, "
            f"this is TensorRT {here.tensorrt_version} (engines are not portable across "
            f"versions); {rebuild}"
        )
    if (
        tuple(record.compute_capability) != tuple(here.compute_capability)
        or record.gpu_name != here.gpu_name
    ):
        cc = ".".join(map(str, record.compute_capability))
        here_cc = ".".join(map(str, here.compute_capability))
        return (
            f"the engine for {record.graph} was built for {record.gpu_name} (compute "
            f"capability {cc}), this GPU is {here.gpu_name} ({here_cc}); {rebuild} on this machine"
        )
    return None


class EngineCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def folder(self, here: Platform) -> Path:
        return (
            self.root
            / re.sub(r"[^A-Za-z0-9._-]+", "_", here.tensorrt_version)
            / gpu_slug(here.gpu_name, here.compute_capability)
        )

    def paths(self, here: Platform, key: str) -> tuple[Path, Path]:
        d = self.folder(here)
        return d / f"{key}.plan", d / f"{key}.json"

    def timing_cache_path(self, here: Platform) -> Path:
        return self.folder(here) / TIMING_CACHE

    def lookup(self, here: Platform, onnx_sha256: str, flags: BuildFlags) -> EngineRecord | None:
        """The record of a complete, matching cached engine, or None."""
        plan, meta = self.paths(here, engine_key(onnx_sha256, flags))
        if not (plan.is_file() and meta.is_file()):
            return None
        record = EngineRecord.from_json(meta.read_text(), str(meta))
        if mismatch(record, here, onnx_sha256) or record.flags != flags:
            return None
        if plan.stat().st_size != record.plan_bytes:
            return None  # the plan changed after it was recorded: rebuild
        return record

    def read_plan(self, here: Platform, record: EngineRecord) -> bytes:
        """The plan's bytes, checked against the sha256 in its record."""
        plan, _ = self.paths(here, record.key)
        data = plan.read_bytes()
        if hashlib.sha256(data).hexdigest() != record.plan_sha256:
            raise BackendError(
                f"engine {plan} does not match its record (changed after it was built); "
                "run 'ddpm-rt build-engines --clear' and build again"
            )
        return data

    def store(self, here: Platform, record: EngineRecord, plan_data: bytes) -> EngineRecord:
        """Write the plan, then its record (the record last: a lookup needs both)."""
        record = replace(
            record, plan_sha256=hashlib.sha256(plan_data).hexdigest(), plan_bytes=len(plan_data)
        )
        plan, meta = self.paths(here, record.key)
        plan.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(plan, lambda f: f.write(plan_data))
        atomic_write(meta, lambda f: f.write(record.to_json().encode()))
        return record

    @contextlib.contextmanager
    def lock(self, here: Platform, key: str):
        """An exclusive lock for building ``key`` (other builders of it wait)."""
        d = self.folder(here)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / f"{key}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def select(
        self, here: Platform, onnx_sha256: str, precision: str, role: str = "unet"
    ) -> EngineRecord:
        """The engine to run this graph here: among cached engines of this graph and
        precision built for this platform, the one with the largest batch range. When there
        is none, BackendError says what exists instead and what to build (``role``: the
        graph is the ``unet`` or a latent bundle's ``decoder``)."""
        found, elsewhere = [], []
        for _, record in self.entries():
            if record is None or record.onnx_sha256 != onnx_sha256:
                continue
            if record.flags.precision != precision:
                continue
            why = mismatch(record, here, onnx_sha256)
            (elsewhere if why else found).append((record, why))
        if found:
            # the largest batch the profile takes (the first input's; all share the axis)
            return max(found, key=lambda rw: next(iter(rw[0].flags.profile.values()))[2][0])[0]
        if elsewhere:
            raise BackendError(elsewhere[0][1])
        what, flag = ("decoder", "decoder") if role == "decoder" else ("U-Net", "unet")
        raise BackendError(
            f"no TensorRT engine for this bundle's {precision} {what} in {self.root}; build it "
            f"with 'ddpm-rt build-engines BUNDLE --{flag}-precision {precision}'"
        )

    def entries(self) -> list[tuple[Path, EngineRecord | None]]:
        """Every engine in the cache with its record (None when the record is damaged)."""
        out = []
        for meta in sorted(self.root.glob("*/*/*.json")):
            try:
                out.append(
                    (meta.with_suffix(".plan"), EngineRecord.from_json(meta.read_text(), ""))
                )
            except BackendError:
                out.append((meta.with_suffix(".plan"), None))
        return out

    def clear(self) -> int:
        """Remove what this cache wrote (engines, records, locks, timing caches, their temp
        files) and the folders left empty; returns the number of engines removed. A folder
        holding anything else is not an engine cache (a mistyped ``--engine-cache``): it is
        refused before anything is removed."""
        if not self.root.exists():
            return 0
        if not self.root.is_dir() or self.root.is_symlink():
            raise InputError(f"engine cache is not a folder: {self.root}")
        own, folders = [], []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if path.is_dir() and not path.is_symlink() and len(rel.parts) <= 2:
                folders.append(path)
            elif _written_here(rel) and path.is_file() and not path.is_symlink():
                own.append(path)
            else:
                raise InputError(
                    f"{self.root} is not a ddpm-rt engine cache (it holds {rel}, which "
                    "build-engines does not write); nothing was removed"
                )
        for path in own:
            path.unlink()
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            folder.rmdir()
        return sum(p.suffix == ".plan" for p in own)


# what store(), lock() and the builder write, and atomic_write's temp files of those
_OWN_NAME = re.compile(
    r"(?:[0-9a-f]{64}\.(?:plan|json|lock)|timing\.cache)"
    r"|\.(?:[0-9a-f]{64}\.(?:plan|json)|timing\.cache)\.\d+\.[^/]*\.tmp"
)


def _written_here(rel: Path) -> bool:
    """Whether a path relative to the cache root is one this cache writes: the files of
    ``<TensorRT version>/<gpu slug>/``, or the timing cache older releases kept one level up."""
    if len(rel.parts) == 3:
        return bool(re.fullmatch(r".+-sm\d+", rel.parts[1]) and _OWN_NAME.fullmatch(rel.name))
    return len(rel.parts) == 2 and rel.name == TIMING_CACHE
