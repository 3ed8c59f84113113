"""The wheel carries every subpackage and data file: built, installed into a fresh virtual
environment and run there as a user runs it, away from the source tree.

(The editable install the other tests use maps ``ddpm_rt`` onto ``runtime/`` and imports any
subpackage found there, so a package missing from pyproject.toml's explicit list only shows
up in a real install.)
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _packages_in_tree() -> set[str]:
    """Every package directory under the folders pyproject maps into ddpm_rt."""
    out = set()
    for folder, name in (
        ("runtime", "ddpm_rt"),
        ("export", "ddpm_rt/export"),
        ("training", "ddpm_rt/training"),
        ("models", "ddpm_rt/models"),
    ):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            out.add(str(Path(name) / rel) if str(rel) != "." else name)
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the files git would commit: a build/ folder left in the checkout
    # by an earlier build would otherwise lend the wheel packages the config does not list.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-cache-dir",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("ddpm_rt-*.whl")
    return whl


def test_wheel_holds_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in sorted(_packages_in_tree()) if f"{p}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (list them in pyproject.toml): {missing}"
    for data in (
        "ddpm_rt/models/default/manifest.json",
        "ddpm_rt/models/default/unet.onnx",
        "ddpm_rt/models/default/tokenizer.json",
        "ddpm_rt/capi/ddpm_rt.h",
        "ddpm_rt/training/everyday_concepts.tsv",
    ):
        assert data in names, f"{data} missing from the wheel"


def test_wheel_installs_into_a_fresh_venv_and_generates(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # The runtime's dependencies come from this environment (a path line: its own .pth
    # files, among them the editable install's finder, are not run); ddpm_rt itself only
    # from the wheel.
    target = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (target / "zz_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-cache-dir",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run(
        [py, "-c", "import ddpm_rt; print(ddpm_rt.__file__)"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    out = tmp_path / "apple.png"
    run = subprocess.run(
        [venv / "bin" / "ddpm-rt", "--prompt", "a red apple", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 0
