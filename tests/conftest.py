from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ddpm-rt`` as a user would: a separate process, text output captured."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_rt.cli", *args],
        cwd=cwd, capture_output=True, text=True, env=env, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ddpm-rt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def shapes_npz(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shapes.npz"
    run_cli("data", "shapes", "--out", str(out), "--num", "256", "--seed", "3")
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, shapes_npz) -> dict:
    """~50 steps of real training through the CLI, then export: a small but real bundle."""
    d = tmp_path_factory.mktemp("trained")
    ckpt, bundle = d / "ckpt", d / "bundle"
    run_cli("train", "--data", str(shapes_npz), "--out", str(ckpt), "--steps", "50",
            "--batch-size", "32", "--n-feat", "32", "--sample-every", "0", "--no-progress")
    exp = run_cli("export", str(ckpt), "--out", str(bundle))
    return {"ckpt": ckpt, "bundle": bundle, "export_log": exp.stderr}
