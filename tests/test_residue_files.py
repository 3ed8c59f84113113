"""Issue 25's file residue, each case failing before its fix: the per-user cache of
optimised graphs read entries with no file-type or size check, and ``quantize`` replaced a
file the bundle does not list and met a missing onnx with a bare ModuleNotFoundError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from craft import write_bundle

from ddpm_rt.backends import ort_cache
from ddpm_rt.bundle.bundle import Bundle

from conftest import run_cli

# Load the bundle's U-Net in a child process: a hang (a FIFO read) fails by the timeout, not
# by hanging the suite; a MemoryError fails by its exit status.
LOAD = (
    "import sys; from ddpm_rt import Generator; g = Generator(sys.argv[1]); "
    "g.backend.session('unet'); print('loaded')"
)


def _load(bundle: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DDPM_RT_CACHE": str(cache)}
    env.pop("DDPM_RT_NO_CACHE", None)
    return subprocess.run(
        [sys.executable, "-c", LOAD, str(bundle)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _entry(bundle: Path, cache: Path, monkeypatch) -> tuple[Path, Path]:
    """The cache entry (graph, record) the U-Net of ``bundle`` is kept under."""
    monkeypatch.setenv("DDPM_RT_CACHE", str(cache))
    sha = Bundle.load(bundle).manifest["files"]["unet.onnx"]["sha256"]
    graph, _ = ort_cache.entry(sha, ["CPUExecutionProvider"])
    return graph, graph.with_suffix(".json")


def _fifo(p: Path):
    p.unlink(missing_ok=True)
    os.mkfifo(p)


def _zero_link(p: Path):
    p.unlink(missing_ok=True)
    p.symlink_to("/dev/zero")


def _sparse_tib(p: Path):
    p.unlink(missing_ok=True)
    with open(p, "wb") as f:
        f.truncate(2**40)  # 1 TiB, sparse: no disk used


@pytest.mark.parametrize("which", ["graph", "record"])
@pytest.mark.parametrize("make", [_fifo, _zero_link, _sparse_tib], ids=["fifo", "dev-zero", "tib"])
def test_a_bad_cache_entry_is_a_miss_that_is_rewritten(tmp_path, monkeypatch, which, make):
    b = write_bundle(tmp_path / "b")
    cache = tmp_path / "cache"
    first = _load(b, cache)  # writes the entry
    assert first.returncode == 0, first.stderr
    graph, record = _entry(b, cache, monkeypatch)
    assert graph.is_file() and record.is_file()
    good = graph.read_bytes()
    make(graph if which == "graph" else record)
    again = _load(b, cache)
    assert again.returncode == 0 and "loaded" in again.stdout, again.stderr[-500:]
    # rewritten as regular files, the same optimised graph
    assert graph.is_file() and not graph.is_symlink() and graph.read_bytes() == good
    assert json.loads(record.read_text())["bytes"] == len(good)


def test_a_cache_record_that_lies_about_the_size_is_a_miss(tmp_path, monkeypatch):
    b = write_bundle(tmp_path / "b")
    cache = tmp_path / "cache"
    assert _load(b, cache).returncode == 0
    _, record = _entry(b, cache, monkeypatch)
    rec = json.loads(record.read_text())
    rec["bytes"] = 2**40
    record.write_text(json.dumps(rec))
    assert ort_cache.lookup(rec["key"]["graph_sha256"], ["CPUExecutionProvider"]) is None
    assert not record.exists()  # dropped, to be rewritten by this run


def test_the_cache_key_holds_the_measured_kernel_family(tmp_path, monkeypatch):
    """An optimised graph made on AVX-512 kernels fails to run on AVX2 ones (NCHWc blocks of
    16 vs 8 channels): the key holds the family as measured, not only /proc/cpuinfo."""
    from ddpm_rt.backends import cpu_kernels

    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path))
    _, meta = ort_cache.entry("0" * 64, ["CPUExecutionProvider"])
    assert meta["kernels"] == cpu_kernels.family()


def test_quantize_without_onnx_is_one_line_naming_the_extra(tmp_path):
    b = write_bundle(tmp_path / "b")
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    for extra in ([], ["--graph", "decoder", "--precision", "int8"]):
        code = (
            "import sys; sys.modules['onnx'] = None\n"  # as if it were not installed
            "from ddpm_rt.cli import main; sys.exit(main(['quantize', sys.argv[1], *sys.argv[2:]]))"
        )
        p = subprocess.run(
            [sys.executable, "-c", code, str(b), *extra],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert p.returncode == 1, p.stderr
        assert p.stderr.strip().splitlines() == [
            "error: this command needs onnx (pip install 'ddpm-rt[export]')"
        ]
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before


@pytest.mark.parametrize(
    ("args", "file"),
    [(["--precision", "fp16"], "unet.fp16.onnx"), ([], "unet.int8-qoperator-u8s8.onnx")],
)
def test_quantize_refuses_to_replace_a_file_the_bundle_does_not_list(tmp_path, args, file):
    b = write_bundle(tmp_path / "b")
    (b / file).write_bytes(b"the user's own file")
    proc = run_cli("quantize", str(b), *args, check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"{file} exists but the manifest does not list it: pass --force" in proc.stderr
    assert (b / file).read_bytes() == b"the user's own file"
    proc = run_cli("quantize", str(b), *args, "--force", check=False)
    assert proc.returncode == 0, proc.stderr
    assert file in Bundle.load(b, hash_all=True).manifest["files"]
