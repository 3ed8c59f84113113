"""Atomic file writes and hashing: nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ddpm_rt.errors import InputError

# Called just before a finished temp file is renamed over its target; one that raises
# leaves the target untouched. The CLI installs one that raises once SIGINT/SIGTERM has
# arrived: native code (an extension module's import, the compiler) can swallow the
# exception the signal raised, and the work then runs on, but its output must not land.
_commit_checks: list[Callable[[], None]] = []


def add_commit_check(check: Callable[[], None]) -> None:
    """Run ``check()`` before every :func:`atomic_write` commits (once per callable)."""
    if check not in _commit_checks:
        _commit_checks.append(check)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then rename it over ``path``.

    Raises :class:`InputError` when the folder is missing or not writable; on any failure
    (signals included: they arrive as exceptions in the CLI) the temp file is removed and
    ``path`` is untouched. The temp file is hidden and named after the writing process
    (``.NAME.PID.XXXX.tmp``), so one left by a killed process (SIGKILL) is removed by the
    next write of the same file.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    remove_stale_temps(path)
    # The name is chosen before the file exists, so a signal's exception at any point after
    # the file is created lands in the try below, which removes it. (tempfile.mkstemp
    # creates the file and then runs more Python before it returns the name: a SIGTERM
    # there once left a temp file behind, found by CI.) O_EXCL: never into an existing file;
    # mode 0666 less the umask: normal permissions.
    tmp = parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        try:  # inside the cleanup: a signal raised as the open returns still removes it
            fd = os.open(tmp, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise InputError(f"cannot write to {parent}: {e.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            write(f)
        for check in _commit_checks:
            check()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # not there when the open itself failed
            tmp.unlink()
        raise
    return path


def remove_stale_temps(path: Path) -> None:
    """Remove temp files of ``path`` left by writers that no longer run (killed by SIGKILL)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


# Filesystems whose "files" are kernel interfaces: writing an image there is never intended.
PSEUDO_FILESYSTEMS = frozenset(
    "proc sysfs devtmpfs devpts cgroup cgroup2 debugfs tracefs securityfs configfs pstore "
    "bpf mqueue hugetlbfs fusectl autofs binfmt_misc efivarfs rpc_pipefs nsfs".split()
)


def filesystem_type(path: str | Path) -> str | None:
    """The type of the filesystem holding ``path`` (Linux: from /proc/self/mounts)."""
    real = os.path.realpath(path)
    best, fstype = "", None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        return None
    return fstype


def check_writable(path: str | Path, force: bool = False, flag: str = "--force") -> None:
    """Fail early (before expensive work) if ``path`` cannot or should not be written.

    An existing file is only replaced with ``force`` (the CLI's ``--force``).
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"output folder does not exist: {parent}")
    if path.is_dir():
        raise InputError(f"output path is a folder: {path}")
    fstype = filesystem_type(parent)
    if fstype in PSEUDO_FILESYSTEMS:
        raise InputError(f"output folder {parent} is on the {fstype} pseudo-filesystem")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output folder is not writable: {parent}")
    if os.path.lexists(path) and not force:
        raise InputError(f"{path} exists; pass {flag} to replace it")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
