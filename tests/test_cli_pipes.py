"""A reader that goes away is not an error: ``ddpm-rt info X.png | head`` ends quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import run_cli


def test_info_into_a_closed_pipe_ends_quietly(tmp_path):
    png = tmp_path / "a.png"
    run_cli("--prompt", "red apple", "--out", str(png))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte is written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ddpm_rt.cli", "info", str(png)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert proc.stderr == ""
    assert proc.returncode == 128 + signal.SIGPIPE
