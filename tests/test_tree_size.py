"""The repository stays small enough to carry whole (issue 27): the tracked tree <= 60 MiB
(a lent GPU machine takes at most 64 MiB of carried files) and ``models/`` <= 60 MB."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREE_LIMIT = 60 * 2**20
MODELS_LIMIT = 60 * 10**6


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_tracked_tree_fits_a_gpu_carry():
    total = sum(p.stat().st_size for p in _tracked() if p.is_file())
    assert total <= TREE_LIMIT, f"tracked tree {total / 2**20:.1f} MiB > 60 MiB"


def test_models_folder_fits():
    total = sum(p.stat().st_size for p in (ROOT / "models").rglob("*") if p.is_file())
    assert total <= MODELS_LIMIT, f"models/ {total / 1e6:.1f} MB > 60 MB"
