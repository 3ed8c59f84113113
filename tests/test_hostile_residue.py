"""The hostile-input residue (issue 17, item 3) and the small CLI items of item 5: surfaces
added after the reliability work. Each test failed against the code before its fix (the
commit that added it says how).

Processes that could hang before a fix run with a timeout, so a regression fails instead of
stalling the suite.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from craft import write_bundle

from ddpm_rt import Generator
from ddpm_rt.config import GenerateConfig, cpus_available, estimate_bytes, memory_limit
from ddpm_rt.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """``ddpm-rt ARGS`` in a subprocess; a hang past ``timeout`` fails the test."""
    return subprocess.run(
        [sys.executable, "-m", "ddpm_rt.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def one_error(proc: subprocess.CompletedProcess, rc: int, match: str) -> None:
    """Refused with exit ``rc`` and one line ``error: ...`` containing ``match``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == rc, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert match in lines[0], proc.stderr


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("residue") / "b")


# -- --prompts: only a regular file, and never more than the limit read ------------------
def test_prompts_from_a_fifo_is_refused_not_waited_on(tmp_path, bundle):
    """A FIFO reports size 0, so a size check passed and reading blocked forever."""
    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    proc = cli("--model", str(bundle), "--prompts", str(fifo), "--out", str(tmp_path / "a.png"))
    one_error(proc, 1, "is not a regular file")
    assert not (tmp_path / "a.png").exists()


def test_prompts_from_dev_zero_is_refused(tmp_path, bundle):
    """/dev/zero reports size 0 and never ends: read whole, it took all the memory."""
    import resource

    def limit():  # so that the old code fails in seconds (MemoryError) instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_rt.cli", "--model", str(bundle), "--prompts", "/dev/zero"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
        cwd=tmp_path,
    )
    one_error(proc, 1, "--prompts /dev/zero is not a regular file")


def test_prompts_file_over_the_limit_is_refused(tmp_path, bundle):
    big = tmp_path / "p.txt"
    big.write_text("a prompt\n" * 200_000)  # 1.8 MB
    proc = cli("--model", str(bundle), "--prompts", str(big), "--out", str(tmp_path / "a.png"))
    one_error(proc, 1, "is over 1 MiB")


def test_prompts_file_is_read(tmp_path, bundle):
    p = tmp_path / "p.txt"
    p.write_text("thing 1\n\n thing 2 \n")
    out = tmp_path / "a.png"
    proc = cli("--model", str(bundle), "--prompts", str(p), "--steps", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(cli("info", str(out)).stdout)["prompts"] == ["thing 1", "thing 2"]


# -- --model '' and unknown commands -------------------------------------------------------
def test_empty_model_is_refused_not_the_shipped_one(tmp_path):
    proc = cli("--model", "", "--prompt", "a happy dog", "--out", str(tmp_path / "a.png"))
    one_error(proc, 1, "--model is empty")
    assert not (tmp_path / "a.png").exists()
    one_error(cli("info", ""), 1, "the bundle is empty")


@pytest.mark.parametrize("argv", [["serv", "--help"], ["serv"], ["prompt", "--num", "2"]])
def test_unknown_command_is_a_usage_error(argv):
    """An unknown word before --help fell through to generate's help, with exit 0."""
    proc = cli(*argv)
    one_error(proc, 2, f"unknown command {argv[0]!r}")
    assert "generate, info" in proc.stderr and proc.stdout == ""


def test_flags_first_still_mean_generate(tmp_path):
    proc = cli("--help")
    assert proc.returncode == 0 and "COMMAND" in proc.stdout
    proc = cli("--num", "0", "--prompt", "x", "--out", str(tmp_path / "a.png"))
    one_error(proc, 1, "num must be between 1")


# -- threads: bounded by the CPUs this process may use ---------------------------------
def test_threads_beyond_the_cpus_are_refused_before_loading(tmp_path):
    """--threads 256 under a memory limit deadlocked ONNX Runtime, deaf to SIGTERM."""
    proc = cli(
        "--model", str(tmp_path / "none"), "--prompt", "x", "--threads", "256",
        "--out", str(tmp_path / "a.png"),
    )  # fmt: skip
    one_error(proc, 1, f"threads must be between 1 and {cpus_available()}")


def test_threads_api(bundle):
    with pytest.raises(InputError, match="the CPUs this process may use"):
        Generator(bundle, threads=cpus_available() + 1)
    gen = Generator(bundle, threads=cpus_available())  # as many as there are is fine
    assert gen.generate("", steps=2).shape == (1, 8, 8, 3)


# -- the memory check counts --trajectory's frames ------------------------------------
def test_trajectory_frames_count_in_the_memory_check(tmp_path):
    """A 1000-frame trajectory of a large grid was not counted: the run started, then
    failed with MemoryError after the work (or ran for hours)."""
    b = write_bundle(tmp_path / "b", timesteps=1000)
    cfg = GenerateConfig(num=10_000, sampler="ddpm", guidance=1.0)
    need = estimate_bytes(cfg, (3, 8, 8), frames=1000, scale=10, gif=True)
    if need <= memory_limit() or estimate_bytes(cfg, (3, 8, 8)) > memory_limit():
        pytest.skip("this machine's memory is outside what the case assumes")
    out = tmp_path / "a.png"
    args = ["--model", str(b), "--prompt", "", "--num", "10000", "--sampler", "ddpm"]
    args += ["--guidance", "1", "--scale", "10", "--out", str(out)]
    proc = cli(*args, "--trajectory", str(tmp_path / "t.gif"), timeout=60)
    one_error(proc, 1, "with a 1000-frame --trajectory needs about")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# -- provenance: the settings as resolved -----------------------------------------------
@pytest.mark.parametrize(
    "flags,want",
    [
        ([], {"sampler": "ddim", "eta": 1.0, "spacing": "time", "steps": 8}),
        (["--sampler", "ddim", "--eta", "0"], {"eta": 0.0, "spacing": "time"}),
        (["--sampler", "dpm++2m", "--spacing", "logsnr"], {"eta": None, "spacing": "logsnr"}),
        (["--sampler", "ddpm"], {"eta": None, "spacing": None, "steps": 20}),
    ],
)
def test_provenance_records_resolved_settings(tmp_path, bundle, flags, want):
    """eta and spacing were saved as null when they came from the defaults."""
    out = tmp_path / "a.png"
    proc = cli("--model", str(bundle), "--prompt", "thing 1", "--out", str(out), *flags)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(cli("info", str(out)).stdout)
    assert {k: info[k] for k in want} == want
    # the recorded settings make the same image again
    from PIL import Image

    keys = ("num", "seed", "sampler", "steps", "eta", "spacing", "guidance")
    again = Generator(bundle).generate(info["prompts"][0], **{k: info[k] for k in keys})
    assert (again[0] == __import__("numpy").asarray(Image.open(out))).all()


# -- info IMAGE.png: the provenance chunk without decoding pixels, bounded ----------------
def _chunk(kind: bytes, data: bytes, length: int | None = None) -> bytes:
    head = struct.pack(">I", len(data) if length is None else length) + kind
    return head + data + struct.pack(">I", zlib.crc32(kind + data))


def _apng(side: int, frames: int, text: bytes) -> bytes:
    """An animated PNG: a side x side canvas of zeros (a few KB compressed), then
    ``frames - 1`` one-pixel frames; the ddpm-rt text chunk before the image data."""
    parts = [
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)),
        _chunk(b"acTL", struct.pack(">II", frames, 0)),
        _chunk(b"iTXt", b"ddpm-rt\0\0\0\0\0" + text),
    ]
    seq = 0

    def fctl(w: int, h: int) -> bytes:
        nonlocal seq
        seq += 1
        return _chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq - 1, w, h, 0, 0, 1, 10, 0, 0))

    parts.append(fctl(side, side))
    z = zlib.compressobj(9)
    row = bytes(1 + 3 * side)
    parts.append(_chunk(b"IDAT", b"".join(z.compress(row) for _ in range(side)) + z.flush()))
    tiny = zlib.compress(bytes(4))
    for _ in range(frames - 1):
        parts.append(fctl(1, 1))
        parts.append(_chunk(b"fdAT", struct.pack(">I", seq) + tiny))
        seq += 1
    return b"".join([*parts, _chunk(b"IEND", b"")])


def test_info_on_an_animated_png_with_a_huge_canvas_does_not_decode_it(tmp_path):
    """Pillow's ``text`` decoded every 48 MB frame to find late text chunks: 43 s for a
    112 KB file of 1000 frames, and longer the more frames."""
    png = tmp_path / "bomb.png"
    png.write_bytes(_apng(4000, 2000, json.dumps({"prompts": ["x"], "seed": 3}).encode()))
    assert png.stat().st_size < 300_000
    proc = cli("info", str(png), timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"prompts": ["x"], "seed": 3}


def test_info_refuses_a_text_chunk_claiming_2_gib(tmp_path):
    png = tmp_path / "claim.png"
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    claim = _chunk(b"iTXt", b"ddpm-rt\0\0\0\0\0{}" + bytes(1 << 20), length=2**31)
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + claim)
    one_error(cli("info", str(png)), 1, "claims 2147483648 bytes, over the limit")


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda b: b[:8] + b"XXXX" + b[12:], "has no ddpm-rt settings"),  # a chunk length lies
        (lambda b: b"GIF89a" + b[6:], "is not a PNG file"),
        (lambda b: b[: b.index(b"ddpm-rt") + 30], "truncated or damaged"),
    ],
    ids=["length", "signature", "truncated"],
)
def test_info_on_damaged_pngs(tmp_path, damage, match):
    from ddpm_rt.images import save_png

    good = save_png(tmp_path / "g.png", __import__("numpy").zeros((4, 4, 3), "uint8"),
                    provenance={"prompts": ["é"]})  # fmt: skip
    assert json.loads(cli("info", str(good)).stdout) == {"prompts": ["é"]}
    bad = tmp_path / "bad.png"
    bad.write_bytes(damage(good.read_bytes()))
    one_error(cli("info", str(bad)), 1, match)


# -- the C ABI under AddressSanitizer ----------------------------------------------------
ASAN = ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]


@pytest.fixture(scope="module")
def asan_built(tmp_path_factory) -> dict:
    """libddpm_rt, the C error-path program and the C++ example, the programs built with
    AddressSanitizer (the library is cffi's C glue; the Python it runs allocates through
    malloc under PYTHONMALLOC=malloc, so ASan sees its buffers)."""
    import shutil

    pytest.importorskip("cffi", reason="pip install 'ddpm-rt[capi]'")
    if sys.platform != "linux" or not (shutil.which("cc") and shutil.which("c++")):
        pytest.skip("the C ABI is built and tested on Linux with cc and c++")
    d = tmp_path_factory.mktemp("asan")
    probe = d / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if subprocess.run(["cc", *ASAN, str(probe), "-o", str(d / "probe")]).returncode != 0:
        pytest.skip("this compiler has no AddressSanitizer runtime (libasan)")
    capi = d / "capi"
    run = {"check": True, "capture_output": True, "text": True}
    subprocess.run([sys.executable, "-m", "ddpm_rt.capi", "--out", str(capi)], **run)
    link = ["-I", str(capi), "-L", str(capi), "-lddpm_rt", f"-Wl,-rpath,{capi}"]
    cpp = ROOT / "examples" / "cpp"
    subprocess.run(["cc", *ASAN, str(cpp / "errors.c"), *link, "-o", str(d / "errors")], **run)
    subprocess.run(
        ["c++", "-std=c++17", *ASAN, str(cpp / "main.cpp"), *link, "-o", str(d / "example")],
        **run,
    )
    return {"errors": d / "errors", "example": d / "example", "dir": d}


def _asan_run(*argv) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONMALLOC": "malloc",  # Python's own allocator would hide its buffers from ASan
        # the interpreter's objects live until exit by design; the errors are what matter
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
    }
    # ASan must be the first library loaded and owns SIGSEGV: .ci/run's CPUID mask (a
    # preload answering CPUID from a SIGSEGV handler) stays out of these memory checks
    env.pop("LD_PRELOAD", None)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def test_c_abi_error_paths_under_asan(asan_built):
    """ddpm_rt_last_error(h) on a handle with no error returned a char[] freed as it
    returned: heap-use-after-free, reported by ASan on the "open" line."""
    proc = _asan_run(asan_built["errors"], ROOT / "models" / "default")
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines())
    assert got["open"] == "0 "  # no error: the empty string, alive
    assert got["num-zero"] == "1 num must be >= 1, got 0"


def test_c_abi_from_image_runs_clean_under_asan(asan_built):
    """ddpm_rt_generate_from_image's successful path (an RGBA picture and a mask, read from
    the host's buffers) under ASan: no report, and every byte of the images written."""
    out = asan_built["dir"] / "from_image.rgb"
    proc = _asan_run(asan_built["errors"], ROOT / "models" / "default", out)
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines())
    assert got["from-image"] == "0 "
    from ddpm_rt.bundle.bundle import Bundle

    c, h, w = Bundle.load(ROOT / "models" / "default").image_shape
    assert out.stat().st_size == 2 * c * h * w


def test_cpp_example_under_asan_matches_the_python_api(asan_built):
    out = asan_built["dir"] / "apple.ppm"
    proc = _asan_run(asan_built["example"], ROOT / "models" / "default", "red apple", 7, 2, out)
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The Python API's bytes from a process on the same CPU kernels as the example's: with
    # .ci/run's CPUID mask this test's own process runs AVX2 kernels, and the shipped
    # cascade's fp32 decoder rounds a few pixels differently on those than on AVX-512
    code = (
        "import sys; from ddpm_rt import Generator; sys.stdout.buffer.write(Generator("
        f"{str(ROOT / 'models' / 'default')!r}).generate('red apple', num=2, seed=7).tobytes())"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    want = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, env=env, timeout=300, check=True
    ).stdout
    assert out.read_bytes().split(b"\n255\n", 1)[1] == want


# -- the optimised-graph cache: what is hashed is what runs ------------------------------
CACHE_GEN = {"sampler": "ddim", "steps": 3, "seed": 4}


@pytest.fixture
def cached(tmp_path, monkeypatch) -> dict:
    """A bundle whose U-Net (eps = 0.1 x) has been run once, so its optimised form is cached."""
    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path / "cache"))
    b = write_bundle(tmp_path / "b")
    first = Generator(b).generate("thing 1", **CACHE_GEN)
    (entry,) = (tmp_path / "cache" / "ort").glob("*.onnx")
    return {"bundle": b, "first": first, "entry": entry}


def _scaled(graph: bytes, old: float, new: float) -> bytes:
    """The same graph with every float initializer equal to ``old`` set to ``new``: still
    valid, the same size, and a different U-Net."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(graph)
    hits = 0
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.size == 1 and np.isclose(a.item(), old):
            init.CopyFrom(numpy_helper.from_array(np.full_like(a, new), init.name))
            hits += 1
    assert hits, "the optimised graph no longer holds the scale as an initializer"
    out = m.SerializeToString()
    assert len(out) == len(graph) and out != graph
    return out


def _forge_stamp(entry: Path) -> None:
    """Rewrite the record's file stamp (as the old cache kept one) to match the file now."""
    rec_path = entry.with_suffix(".json")
    rec = json.loads(rec_path.read_text())
    if "stamp" in rec:
        st = entry.stat()
        rec["stamp"] = [st.st_ino, st.st_size, st.st_mtime_ns]
        rec_path.write_text(json.dumps(rec))


def test_cached_graph_edited_in_place_does_not_run(cached):
    """Same inode, same size, mtime set back: the old stamp check trusted it."""
    import numpy as np

    entry = cached["entry"]
    good = entry.read_bytes()
    st = entry.stat()
    with open(entry, "r+b") as f:
        f.write(_scaled(good, 0.1, 0.9))
    os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = Generator(cached["bundle"]).generate("thing 1", **CACHE_GEN)
    np.testing.assert_array_equal(again, cached["first"])
    assert entry.read_bytes() == good  # the entry was dropped and written again


def test_cached_graph_replaced_with_its_stamp_rewritten_does_not_run(cached):
    import numpy as np

    entry = cached["entry"]
    other = _scaled(entry.read_bytes(), 0.1, -0.5)
    entry.unlink()
    entry.write_bytes(other)
    _forge_stamp(entry)
    again = Generator(cached["bundle"]).generate("thing 1", **CACHE_GEN)
    np.testing.assert_array_equal(again, cached["first"])


def test_an_error_from_a_cached_graph_names_the_cache(cached):
    """A record forged whole (its sha256 too) cannot be told from a real one; what such a
    graph does wrong is reported as coming from the cache, so the user knows what to remove."""
    import hashlib

    from craft import unet_graph

    from ddpm_rt.errors import BackendError

    entry = cached["entry"]
    entry.write_bytes(unet_graph(4, declared_out=["batch", 3, 4, 4]))
    rec = json.loads(entry.with_suffix(".json").read_text())
    rec["sha256"] = hashlib.sha256(entry.read_bytes()).hexdigest()
    rec["bytes"] = entry.stat().st_size  # forged whole: its size too
    rec.pop("stamp", None)
    entry.with_suffix(".json").write_text(json.dumps(rec))
    with pytest.raises(BackendError, match=f"as optimised in the cache at {entry}"):
        Generator(cached["bundle"]).generate("thing 1", **CACHE_GEN)


# -- quantize: validated before writing, never over an input, judged by the shared check --
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def conv_unet(outlier: float) -> bytes:
    """eps = Conv1x1(x + P) - Conv1x1(P), P zero but for one pixel of value ``outlier``: in
    fp32 about Conv1x1(x) whatever ``outlier``; quantised (uint8 activations, MinMax
    calibration), an outlier of 1e4 stretches the Conv input's and output's ranges so far
    that every ordinary value rounds to the zero point -- a graph that must fail its
    parity check at every timestep, however the calibration and check sets are split."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))

    w = 0.5 * np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.2], [0.2, 0.0, 1.0]], np.float32)
    p = np.zeros((1, 3, 8, 8), np.float32)
    p[0, 0, 0, 0] = outlier
    q = np.einsum("oi,bihw->bohw", w, p).astype(np.float32)  # Conv1x1(P)
    nodes = [
        const("zero", np.array(0.0, np.float32)),
        const("axes23", np.array([2, 3], np.int64)),
        helper.make_node("Add", ["x", "P"], ["xp"]),
        helper.make_node("Conv", ["xp", "W", "B"], ["y"]),
        helper.make_node("Sub", ["y", "Q"], ["y2"]),
        helper.make_node("ReduceSum", ["c"], ["cs"], keepdims=1),
        helper.make_node("Mul", ["cs", "zero"], ["c0"]),
        helper.make_node("Unsqueeze", ["c0", "axes23"], ["c0b"]),
        helper.make_node("Add", ["y2", "c0b"], ["eps"]),
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "unet",
        [
            vi("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
            vi("t", TensorProto.FLOAT, ["batch", 1]),
            vi("c", TensorProto.FLOAT, ["batch", 4]),
        ],
        [vi("eps", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        initializer=[
            numpy_helper.from_array(w.reshape(3, 3, 1, 1), "W"),
            numpy_helper.from_array(np.zeros(3, np.float32), "B"),
            numpy_helper.from_array(p, "P"),
            numpy_helper.from_array(q, "Q"),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def test_quantize_fails_a_graph_that_must_fail_its_check(tmp_path):
    from ddpm_rt.export.quantize import QuantizeError, quantize_bundle

    b = write_bundle(tmp_path / "b", unet=conv_unet(1e4))
    before = _snapshot(b)
    with pytest.raises(QuantizeError, match="misses its parity check"):
        quantize_bundle(b, log=lambda s: None)
    assert _snapshot(b) == before


def test_quantize_passes_the_same_graph_without_the_outlier(tmp_path):
    """The control: the check is not one that refuses everything; a redo with force keeps
    the bundle loadable."""
    import numpy as np

    from ddpm_rt import Bundle
    from ddpm_rt.export.quantize import INT8_FILE, quantize_bundle

    b = write_bundle(tmp_path / "b", unet=conv_unet(0.0))
    entry = quantize_bundle(b, log=lambda s: None)
    assert entry["checks"]["mean_cosine"] >= 0.98
    assert (b / INT8_FILE).is_file() and "int8" in Bundle.load(b).unet_precisions
    fp32 = Generator(b).generate("thing 1", steps=3)
    int8 = Generator(b, unet_precision="int8").generate("thing 1", steps=3)
    assert np.abs(fp32.astype(int) - int8).max() <= 8
    quantize_bundle(b, force=True, log=lambda s: None)
    Bundle.load(b, hash_all=True)


def test_quantize_refuses_a_unet_that_outputs_nan(tmp_path):
    """It passed its own check (NaN compares false) and wrote NaN into manifest.json,
    leaving a bundle that no longer loaded."""
    from craft import unet_graph

    from ddpm_rt import Bundle
    from ddpm_rt.export.quantize import QuantizeError, quantize_bundle

    b = write_bundle(tmp_path / "b", unet=unet_graph(4, bad_value=float("nan"), bad_below_t=0.5))
    before = _snapshot(b)
    with pytest.raises(QuantizeError, match="non-finite values along its own trajectories"):
        quantize_bundle(b, log=lambda s: None)
    assert _snapshot(b) == before
    Bundle.load(b, hash_all=True)


def test_quantize_never_writes_over_the_fp32_graph(tmp_path):
    """A bundle whose fp32 U-Net is stored under the int8 graph's file name: it was
    overwritten by the int8 graph."""
    from ddpm_rt import Bundle
    from ddpm_rt.export.quantize import INT8_FILE, QuantizeError, quantize_bundle

    b = write_bundle(tmp_path / "b", unet=conv_unet(0.0))
    m = json.loads((b / "manifest.json").read_text())
    (b / "unet.onnx").rename(b / INT8_FILE)
    m["files"][INT8_FILE] = m["files"].pop("unet.onnx")
    m["graphs"]["unet"]["file"] = INT8_FILE
    (b / "manifest.json").write_text(json.dumps(m))
    before = _snapshot(b)
    with pytest.raises(QuantizeError, match=f"already uses {INT8_FILE}"):
        quantize_bundle(b, log=lambda s: None)
    assert _snapshot(b) == before
    Bundle.load(b, hash_all=True)


def test_quantize_via_cli_is_one_line(tmp_path):
    b = write_bundle(tmp_path / "b", unet=conv_unet(1e4))
    proc = cli("quantize", str(b))
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the progress lines, one error line
    assert last.startswith("error: int8 U-Net misses its parity check"), proc.stderr


# -- reports use paths relative to the repo ---------------------------------------------
ABSOLUTE = __import__("re").compile(r"(?<![\w.~])/(?:home|root|work|tmp|Users|mnt|srv)/\S+")


def test_reports_and_docs_hold_no_absolute_paths():
    """BENCHMARKS.md showed /work/main/runs/old107: a path on one machine."""
    files = [ROOT / "BENCHMARKS.md", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "models").glob("*/*.md")) + sorted((ROOT / "models").glob("*/*.json"))
    found = {f.relative_to(ROOT).as_posix(): ABSOLUTE.findall(f.read_text()) for f in files}
    assert {k: v for k, v in found.items() if v} == {}


def test_bench_reports_the_compared_bundle_as_named(tmp_path):
    write_bundle(tmp_path / "a")
    write_bundle(tmp_path / "old")
    args = ["bench", "a", "--sections", "unet", "--compare", "old", "--batch-sizes", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_rt.cli", *args, "--repeats", "2", "--no-compile"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "U-Net per-step cost vs old:" in proc.stdout, proc.stdout
    assert str(tmp_path) not in proc.stdout


def test_a_graph_refused_by_its_spec_is_never_cached(tmp_path, monkeypatch):
    """It was cached before the check, so the second run's error blamed the cache."""
    from craft import unet_graph

    from ddpm_rt.errors import BackendError

    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path / "cache"))
    b = write_bundle(tmp_path / "b", unet=unet_graph(4, in_names=("y", "t", "c")))
    errors = []
    for _ in range(2):
        with pytest.raises(BackendError) as e:
            Generator(b).generate("thing 1", **CACHE_GEN)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "cache" not in errors[1]
    assert not list((tmp_path / "cache").rglob("*.onnx"))
