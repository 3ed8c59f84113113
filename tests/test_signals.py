"""Signals in the CLI: SIGINT/SIGTERM at any moment end with one line, exit 128+n, no temp
file; SIGKILL leaves at most a hidden temp file, which the next run removes.

Test ids start with ``signal-`` (docs/reliability.md counts them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from craft import unet_graph, write_bundle

from ddpm_rt import Bundle

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _default_signals() -> None:
    # A command a non-interactive shell starts in the background (`cmd &`, no job control)
    # ignores SIGINT, every child inherits that, and the CLI rightly keeps an inherited
    # "ignore": so the child gets a terminal's dispositions whatever started pytest.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "ddpm_rt.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_default_signals,
    )


def _wait_for_handlers(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Until the CLI has installed its SIGINT/SIGTERM handlers (read from /proc). Before
    that, the interpreter itself is starting (~20 ms, no ddpm-rt code has run) and a signal
    gets Python's default handling; see docs/cli.md, "Errors and signals"."""
    mask = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            return
        caught = int(
            next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt")), 16
        )
        if caught & mask == mask:
            return
        time.sleep(0.001)


def _wait_for_mapped(proc: subprocess.Popen, library: str, timeout: float = 60) -> None:
    """Until the process has mapped ``library`` (read from /proc): torch is loaded, its
    import is about over, and the work that uses it is next."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            if library in Path(f"/proc/{proc.pid}/maps").read_text():
                return
        except OSError:
            return
        time.sleep(0.005)


def _assert_interrupted(proc: subprocess.Popen, sig: int) -> str:
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    # never "finished before the signal": every job here runs for seconds, so exit 0 means
    # the signal was lost (or ignored), which is the failure these tests look for
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == f"error: interrupted by {signal.Signals(sig).name}"
    return err


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory) -> Path:
    """The most timesteps a manifest may have: DDPM runs all 10,000 of them, 64 images with
    guidance (128 rows), about 6 s of CPU on a 2-core x86 (20 s when shared), and loading
    takes well under a second -- so a signal 1.5 s in lands mid-sampling, deterministically:
    no hook in production code, and exit 0 (finished first) is a failure."""
    # eps = x keeps x_t bounded over the DDPM steps (eps = 0.1 x would diverge, and the
    # runtime would rightly stop it with a numerical error)
    return write_bundle(
        tmp_path_factory.mktemp("sig") / "b", unet=unet_graph(4, scale=1.0), timesteps=10_000
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("delay", [0.0, 0.2, 1.5], ids=["imports", "loading", "sampling"])
def test_signal_during_generation(slow_bundle, tmp_path, sig, delay):
    out = tmp_path / "o"
    out.mkdir()
    proc = _start(
        "--model",
        str(slow_bundle),
        "--prompt",
        "thing 1",
        "--sampler",
        "ddpm",
        "--num",
        "64",
        "--out",
        str(out / "a.png"),
        "--no-progress",
    )
    _wait_for_handlers(proc)
    time.sleep(delay)
    proc.send_signal(sig)
    _assert_interrupted(proc, sig)
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def big_png_bundle(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("sigpng") / "b", timesteps=2)


def _wait_for_temp(folder: Path, proc: subprocess.Popen, timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if any(p.name.endswith(".tmp") for p in folder.iterdir()):
            return True
        time.sleep(0.005)
    return False


def _png_job(bundle: Path, out: Path) -> subprocess.Popen:
    # 20,000 images as one 7.7k x 7.7k grid: the PNG encode takes seconds
    return _start(
        "--model",
        str(bundle),
        "--prompt",
        "thing 1",
        "--num",
        "20000",
        "--batch-size",
        "4096",
        "--scale",
        "6",
        "--out",
        str(out),
        "--no-progress",
        "--sampler",
        "ddim",
        "--steps",
        "2",
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_png_write(big_png_bundle, tmp_path, sig):
    out = tmp_path / "o"
    out.mkdir()
    proc = _png_job(big_png_bundle, out / "a.png")
    assert _wait_for_temp(out, proc), "the PNG write never started"
    proc.send_signal(sig)
    _assert_interrupted(proc, sig)
    assert proc.returncode == 128 + sig
    assert list(out.iterdir()) == []


def test_sigkill_leaves_at_most_a_hidden_temp_which_the_next_run_removes(big_png_bundle, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    proc = _png_job(big_png_bundle, out / "a.png")
    assert _wait_for_temp(out, proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = [p.name for p in out.iterdir()]
    assert len(left) <= 1 and all(n.startswith(".a.png.") and n.endswith(".tmp") for n in left)
    done = _start(
        "--model",
        str(big_png_bundle),
        "--prompt",
        "thing 1",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--out",
        str(out / "a.png"),
        "--no-progress",
    )
    _, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    assert [p.name for p in out.iterdir()] == ["a.png"]


@pytest.mark.parametrize("when", ["early", "tracing", "late"])
def test_signal_during_export(trained, tmp_path, when):
    """Export interrupted at any moment: no temp files; any manifest written is valid.
    The whole export takes under 2 s on an idle machine, so no fixed delay lands reliably:
    "early" lands while torch is being imported (signals are deferred there: raised inside
    torch's pybind11 callbacks, they ended in std::terminate, exit by SIGABRT); "tracing"
    once torch is mapped (its import about over, tracing next); "late" after the export's own
    first parity line (its second parity check and the writes are still to come)."""
    out = tmp_path / "bundle"
    proc = _start("export", str(trained["ckpt"]), "--out", str(out))
    _wait_for_handlers(proc)
    if when == "late":
        for line in proc.stderr:
            if line.startswith("parity unet batch 1"):
                break
    elif when == "tracing":
        _wait_for_mapped(proc, "libtorch_cpu")
        time.sleep(0.05)
    else:
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _assert_interrupted(proc, signal.SIGTERM)
    if out.exists():
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        if (out / "manifest.json").exists():
            json.loads((out / "manifest.json").read_text())
            Bundle.load(out)


def test_a_signal_while_main_finishes_does_not_raise():
    """main() sets its 'finishing' flag before switching the handlers off; a signal landing
    between the two switches is recorded, not raised inside the finally block."""
    from ddpm_rt import cli

    try:
        cli._finishing.append(True)
        cli._raise_signalled(signal.SIGTERM, None)  # no exception
        cli._finishing.clear()
        with pytest.raises(cli.Signalled):
            cli._raise_signalled(signal.SIGTERM, None)
    finally:
        cli._finishing.clear()
        cli._received.clear()


def test_a_signal_in_a_deferred_block_is_raised_when_it_ends():
    """Inside signals_deferred (a command importing torch) a signal is recorded, not raised
    into native code's callbacks; it is raised as soon as the block is over."""
    from ddpm_rt import cli

    reached = []
    try:
        with pytest.raises(cli.Signalled), cli.signals_deferred():
            cli._raise_signalled(signal.SIGTERM, None)  # no exception here
            reached.append(True)
        assert reached == [True]
    finally:
        cli._received.clear()


# The CLI, with the Generator's constructor wrapped so that a signal arriving while the
# graphs load has its exception swallowed -- as native code did under load (an extension
# module's import, the compiler): CI once found the PNG of an interrupted run.
_SWALLOWING = r"""
import os, signal, sys
import ddpm_rt.generator as g
from ddpm_rt import cli
real = g.Generator.__init__
def init(self, *a, **k):
    real(self, *a, **k)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)  # a point where the pending handler runs
        for _ in range(1000):
            pass
    except BaseException:
        pass
g.Generator.__init__ = init
import ddpm_rt.images as images
real_save = images.save_png
def save_png(*a, **k):  # reached only if the sampling ran to its end
    print("sampling finished", file=sys.stderr)
    return real_save(*a, **k)
images.save_png = save_png
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_swallowed_signal_still_stops_the_work_and_writes_nothing(slow_bundle, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    args = ["--model", str(slow_bundle), "--prompt", "thing 1", "--sampler", "ddpm"]
    proc = subprocess.run(
        [sys.executable, "-c", _SWALLOWING, *args, "--num", "64", "--out", str(out / "a.png")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        preexec_fn=_default_signals,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: interrupted by SIGTERM"]
    assert list(out.iterdir()) == []


def test_no_file_is_committed_once_a_signal_arrived(tmp_path):
    """The last line of defence: atomic_write runs the CLI's check before its rename."""
    from ddpm_rt import cli
    from ddpm_rt.bundle.fileio import add_commit_check, atomic_write

    add_commit_check(cli.raise_if_signalled)
    try:
        cli._received.append(signal.SIGINT)
        with pytest.raises(cli.Signalled):
            atomic_write(tmp_path / "a.png", lambda f: f.write(b"x"))
        assert list(tmp_path.iterdir()) == []
    finally:
        cli._received.clear()
    atomic_write(tmp_path / "a.png", lambda f: f.write(b"x"))  # no signal: written
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_a_signal_as_the_temp_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    """A signal's exception raised just as the temp file's open returns (before its name is
    known to the code that cleans up) leaves no file: tempfile.mkstemp's did (CI found a
    ``.unet.onnx.PID.*.tmp`` after SIGTERM during export)."""
    from ddpm_rt.bundle.fileio import atomic_write

    real_open = os.open

    def open_then_signal(*args, **kwargs):
        os.close(real_open(*args, **kwargs))
        raise KeyboardInterrupt  # what a signal handler raises at the next bytecode

    monkeypatch.setattr(os, "open", open_then_signal)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a.png", lambda f: f.write(b"x"))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
