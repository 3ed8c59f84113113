"""Atomic file writes and hashing: nothing half-written is ever left behind."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import InputError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then rename it over ``path``.

    Raises :class:`InputError` when the folder is missing or not writable; on any failure the
    temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise InputError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | Path) -> None:
    """Fail early (before expensive work) if ``path`` cannot be created."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    if path.is_dir():
        raise InputError(f"output path is a folder: {path}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output folder is not writable: {parent}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
