"""Bundles: one self-describing folder holding everything a runtime needs.

A bundle is untrusted input. Loading one:

1. reads ``manifest.json`` (a regular file inside the folder, at most 4 MiB); its sha256 is
   the bundle's **digest**, which pins every file (and is compared first with
   ``expected_digest`` when the caller has one from a trusted place);
2. validates the whole manifest strictly (:mod:`ddpm_rt.bundle.manifest`): types, ranges, graph
   specs against the runtime's I/O spec, plain file names;
3. resolves every listed file inside the folder (no symlink may lead out) and compares its
   size with the declared ``bytes`` -- cheap checks, before any file is read;
4. with ``hash_all`` (``ddpm-rt info``), hashes every listed file.

Files are then read only through :meth:`Bundle.read_file` (the bytes, hashed) or
:meth:`Bundle.open_verified` (the verified open file): what is hashed is exactly what the
backend loads, so a file swapped after loading cannot be used unverified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from ddpm_rt.bundle.io_spec import GraphIO
from ddpm_rt.bundle.manifest import MAX_MANIFEST_BYTES, SCHEMA_VERSION, validate_manifest
from ddpm_rt.core.schedule import ScheduleConfig
from ddpm_rt.errors import BundleError, InputError, first_line

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Bundle"]

MANIFEST = "manifest.json"
_DIGEST = re.compile(r"[0-9a-f]{64}")


class Bundle:
    """A loaded, validated bundle. Use :meth:`load`."""

    def __init__(self, path: Path, manifest: dict, digest: str):
        self.path = path
        self.manifest = manifest
        self.digest = digest  # sha256 of manifest.json's bytes
        img = manifest["image"]
        self.image_shape = (img["channels"], img["height"], img["width"])  # the output pixels
        lat = manifest.get("latent")
        self.latent: dict | None = lat  # None for a pixel bundle
        # what the U-Net samples: the latent (C, h, w) of a latent bundle, else the image
        self.sample_shape = (
            (lat["channels"], lat["height"], lat["width"]) if lat else self.image_shape
        )
        # a cascade (latent kind "pixels"): the base model's picture, which a caller may take
        # without the decoder
        self.base_shape = self.sample_shape if lat and lat.get("kind") == "pixels" else None
        self.schedule = ScheduleConfig.from_dict(manifest["schedule"])
        self.conditioning: dict = manifest["conditioning"]
        self.graphs = {k: GraphIO.from_dict(k, v) for k, v in manifest["graphs"].items()}

    @property
    def sizes(self) -> tuple[int, ...]:
        """The picture heights this bundle gives: its image's, and a cascade's base picture's."""
        base = () if self.base_shape is None else (self.base_shape[1],)
        return (self.image_shape[1], *base)

    def output_shape(self, size: int | None = None) -> tuple[int, int, int]:
        """(3, H, W) of the pictures at ``size`` (one of :attr:`sizes`; None: the image's)."""
        if size is None or size == self.image_shape[1]:
            return self.image_shape
        if self.base_shape is not None and size == self.base_shape[1]:
            return self.base_shape
        from ddpm_rt.errors import InputError

        raise InputError(
            f"size {size} is not one this model gives (choose from: "
            f"{', '.join(map(str, self.sizes))})",
            "size",
        )

    @property
    def context_dim(self) -> int:
        return int(self.conditioning["context_dim"])

    @property
    def unet_precisions(self) -> dict[str, str]:
        """U-Net precision -> graph name (``fp32`` is always ``unet``)."""
        extra = self.manifest.get("unet_precisions", {})
        return {"fp32": "unet", **{p: e["graph"] for p, e in extra.items()}}

    def distillation(self, precision: str) -> dict | None:
        """What the U-Net at ``precision`` was distilled for (``guidance``: w range, the
        graph takes w; ``steps``: the deterministic steps it takes), None for an ordinary
        U-Net (issue 29; docs/bundle-format.md)."""
        entry = self.manifest.get("unet_precisions", {}).get(precision) or {}
        return entry.get("distilled")

    def recommended_for(self, precision: str | None) -> dict:
        """The settings recommended for the U-Net at ``precision``: a distilled variant's
        own, else the bundle's (:attr:`recommended`)."""
        entry = self.manifest.get("unet_precisions", {}).get(precision) or {}
        rec = entry.get("recommended")
        if rec is None:
            return self.recommended
        return {k: v for k, v in rec.items() if v is not None}

    @property
    def decoder_precisions(self) -> dict[str, str]:
        """A latent bundle's decoder precision -> graph name; {} for a pixel bundle."""
        return dict(self.latent["decoder"]["graphs"]) if self.latent else {}

    @property
    def recommended(self) -> dict:
        """The model's own default settings (``sampler``, ``steps``, ``eta``, ``guidance``,
        ``spacing``; any may be absent), validated with the manifest; {} when it has none."""
        return {k: v for k, v in self.manifest.get("recommended", {}).items() if v is not None}

    @property
    def label_names(self) -> list[str]:
        return list(self.conditioning.get("label_names", []))

    def file_path(self, name: str) -> Path:
        """The real path of a listed file, confined to the bundle folder."""
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle {self.path} does not list a file {name!r}")
        return _inside(self.path, name)

    def read_file(self, name: str) -> bytes:
        """A listed file's bytes, checked against the declared size and sha256."""
        meta = self.manifest["files"][name] if name in self.manifest["files"] else None
        path = self.file_path(name)
        data = read_regular(path, meta["bytes"], f"bundle file {name}")
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise BundleError(
                f"bundle file {path} does not match its sha256 in {MANIFEST} (corrupt or "
                "modified; re-export the bundle)"
            )
        return data

    def graph_bytes(self, graph: str) -> bytes:
        if graph not in self.graphs:
            raise BundleError(f"bundle {self.path} has no graph {graph!r}")
        return self.read_file(self.graphs[graph].file)

    @contextlib.contextmanager
    def open_verified(self, name: str) -> Iterator[str | bytes]:
        """What to hand a loader for a listed file: a path to the *verified open file*.

        The file is opened once, its size checked, its bytes hashed through that descriptor,
        and the loader is given ``/proc/self/fd/N`` (``/dev/fd/N``): the same open file, so a
        file renamed or swapped in after hashing is never what gets loaded. Any write to the
        file changes its ctime, which no user can set back: the inode, size, mtime and ctime
        are compared once the loader is done, and a change is an error. This costs no memory
        (loading the verified bytes instead raised peak RSS by ~46 MB on the shipped bundle).
        Where there is no fd path (not Linux or macOS), the verified bytes are handed over.
        """
        meta = self.manifest["files"].get(name)
        if meta is None:
            raise BundleError(f"bundle {self.path} does not list a file {name!r}")
        path = self.file_path(name)
        fd_dir = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)
        if fd_dir is None:
            yield self.read_file(name)
            return
        fd = _open_regular(path, meta["bytes"], f"bundle file {name}")
        try:
            before = os.fstat(fd)
            h = hashlib.sha256()
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
            if h.hexdigest() != meta["sha256"]:
                raise BundleError(
                    f"bundle file {path} does not match its sha256 in {MANIFEST} (corrupt or "
                    "modified; re-export the bundle)"
                )
            os.lseek(fd, 0, os.SEEK_SET)
            yield f"{fd_dir}/{fd}"
            after = os.fstat(fd)
            fields = ("st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")
            if any(getattr(before, f) != getattr(after, f) for f in fields):
                raise BundleError(f"bundle file {path} was modified while it was loaded")
        finally:
            os.close(fd)

    @classmethod
    def load(
        cls, path: str | Path, *, hash_all: bool = True, expected_digest: str | None = None
    ) -> Bundle:
        """Load and validate a bundle folder (see the module docstring for the checks).

        ``hash_all=False`` defers hashing to :meth:`read_file` (what a :class:`Generator`
        does: it hashes exactly the bytes it loads, and only the files it uses).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"bundle must be a folder path, got {type(path).__name__}")
        if expected_digest is not None and not (
            isinstance(expected_digest, str) and _DIGEST.fullmatch(expected_digest)
        ):
            raise InputError("expected digest must be 64 lowercase hex digits (sha256)")
        path = Path(path)
        if not path.exists():
            raise BundleError(f"bundle not found: {path}")
        if not path.is_dir():
            raise BundleError(f"not a bundle folder: {path}")
        root = Path(os.path.realpath(path))
        mpath = root / MANIFEST
        if not os.path.lexists(mpath):
            raise BundleError(f"not a bundle (no {MANIFEST}): {path}")
        data = read_regular(_inside(root, MANIFEST), None, MANIFEST, MAX_MANIFEST_BYTES)
        digest = hashlib.sha256(data).hexdigest()
        if expected_digest is not None and digest != expected_digest:
            raise BundleError(
                f"bundle {path} has digest {digest}, not the expected {expected_digest} "
                "(a different or modified bundle)"
            )
        try:
            manifest = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else first_line(e)
            raise BundleError(f"corrupt {mpath}: {why}") from None
        validate_manifest(manifest)
        bundle = cls(root, manifest, digest)
        for name, meta in manifest["files"].items():
            f = bundle.file_path(name)
            st = _stat_regular(f, f"bundle file {name}")
            if st.st_size != meta["bytes"]:
                raise BundleError(
                    f"bundle file {f} has {st.st_size} bytes, the manifest says {meta['bytes']} "
                    "(corrupt or modified; re-export the bundle)"
                )
        if hash_all:
            for name in manifest["files"]:
                bundle.read_file(name)
        return bundle


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _inside(root: Path, name: str) -> Path:
    """root/name resolved; refuses anything (a symlink, say) that leads out of root."""
    real = Path(os.path.realpath(root / name))
    if real.parent != root and root not in real.parents:
        raise BundleError(f"bundle file {name} leads outside the bundle folder (via a symlink)")
    return real


def _stat_regular(path: Path, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BundleError(f"{what} is missing: {path}") from None
    except OSError as e:
        raise BundleError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{what} is not a regular file: {path}")
    return st


def _open_regular(path: Path, size: int | None, what: str, limit: int | None = None) -> int:
    """A descriptor on a regular file, refused (and closed) when its size is not ``size`` or
    is over ``limit`` -- checked before a byte is read. Never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise BundleError(f"{what} is missing: {path}") from None
    except OSError as e:
        raise BundleError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{what} is not a regular file: {path}")
        if size is not None and st.st_size != size:
            raise BundleError(
                f"{what} has {st.st_size} bytes, the manifest says {size} "
                "(corrupt or modified; re-export the bundle)"
            )
        if limit is not None and st.st_size > limit:
            raise BundleError(f"{what} is {st.st_size} bytes, over the limit of {limit}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, size: int | None, what: str, limit: int | None = None) -> bytes:
    """Read a regular file whole through one descriptor (size checked first)."""
    fd = _open_regular(path, size, what, limit)
    with os.fdopen(fd, "rb") as f:
        expected = os.fstat(f.fileno()).st_size
        data = f.read(expected + 1)
    if len(data) != expected:
        raise BundleError(f"{what} changed while it was read: {path}")
    return data


def write_recommended(path: str | Path, settings: dict, precision: str | None = None) -> str:
    """Record a model's own default settings (``sampler``, ``steps``, ``eta``, ``guidance``,
    ``spacing``; None values left out) in its bundle's manifest -- with ``precision``, that
    U-Net variant's own (``unet_precisions.<precision>.recommended``, a distilled U-Net's):
    the bundle is loaded and checked first, the new manifest validated before it is written,
    and ``manifest.json`` is replaced atomically. Returns the new digest (the sha256 of
    manifest.json)."""
    from ddpm_rt.bundle.fileio import atomic_write

    bundle = Bundle.load(path)
    manifest = json.loads(json.dumps(bundle.manifest))
    rec = {k: v for k, v in settings.items() if v is not None}
    if precision is None:
        manifest["recommended"] = rec
    elif precision in manifest.get("unet_precisions", {}):
        manifest["unet_precisions"][precision]["recommended"] = rec
    else:
        raise InputError(f"{bundle.path} has no {precision} U-Net to recommend settings for")
    validate_manifest(manifest)
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    atomic_write(bundle.path / MANIFEST, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()
