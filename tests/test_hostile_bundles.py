"""Hostile bundles: every class of damaged or crafted bundle ends in one clear error.

Test ids start with the defect class (``manifest-``, ``path-``, ``file-``, ``graph-``,
``numeric-``, ``external-``, ``digest-``); scripts/reliability_table.py counts them into
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from craft import (
    file_entry,
    read_manifest,
    rehash,
    text_graph,
    unet_graph,
    write_bundle,
    write_manifest,
)

from ddpm_rt import Bundle, Generator
from ddpm_rt.backends.ort import check_outputs
from ddpm_rt.bundle.io_spec import unet_io
from ddpm_rt.bundle.manifest import validate_manifest
from ddpm_rt.errors import BackendError, BundleError, DdpmRtError, InputError, NumericalError

from conftest import run_cli

NAN, INF = float("nan"), float("inf")
GEN = {"sampler": "ddim", "steps": 6, "num": 2, "seed": 0}


@pytest.fixture(scope="module")
def tokenizer_bytes(tiny_text) -> bytes:
    return (tiny_text / "tokenizer.json").read_bytes()


@pytest.fixture
def good(tmp_path) -> Path:
    return write_bundle(tmp_path / "b")


def _set(m: dict, path: str, value):
    keys = path.split(".")
    for k in keys[:-1]:
        m = m[k]
    if value is _DELETE:
        del m[keys[-1]]
    else:
        m[keys[-1]] = value


_DELETE = object()

# (id, field path, bad value, what the one-line error must contain)
MANIFEST_CASES = [
    ("schema-zero", "schema_version", 0, "schema_version: must be an integer >= 1"),
    ("schema-negative", "schema_version", -3, "schema_version"),
    ("schema-bool", "schema_version", True, "schema_version"),
    ("schema-string", "schema_version", "1", "schema_version"),
    ("schema-float", "schema_version", 1.0, "schema_version"),
    ("schema-newer", "schema_version", 2, "upgrade ddpm-rt"),
    ("schema-missing", "schema_version", _DELETE, "schema_version: missing"),
    (
        "requires-unknown",
        "requires",
        ["unet-fp8"],
        "requires feature(s) this ddpm-rt does not have: unet-fp8",
    ),
    ("requires-type", "requires", "unet-fp8", "requires: must be a list"),
    ("image-missing", "image", _DELETE, "image: missing"),
    ("image-list", "image", [3, 8, 8], "image: must be an object"),
    ("channels-4", "image.channels", 4, "image.channels"),
    ("height-string", "image.height", "8", "image.height"),
    ("height-huge", "image.height", 10**9, "image.height: must be an integer in [4, 1024]"),
    ("height-odd", "image.height", 10, "divisible by 4"),
    ("width-bool", "image.width", True, "image.width"),
    (
        "timesteps-huge",
        "schedule.timesteps",
        10**9,
        "schedule.timesteps: must be an integer in [1, 10000]",
    ),
    ("timesteps-zero", "schedule.timesteps", 0, "schedule.timesteps"),
    ("timesteps-float", "schedule.timesteps", 20.5, "schedule.timesteps"),
    ("beta-nan", "schedule.beta_start", "NaN", "NaN is not valid JSON"),
    ("beta-one", "schedule.beta_end", 1.0, "schedule.beta_end"),
    ("beta-order", "schedule.beta_start", 0.5, "must not exceed beta_end"),
    ("beta-list", "schedule.beta_end", [0.02], "schedule.beta_end"),
    ("schedule-kind", "schedule.kind", "cosine", "schedule.kind: must be one of linear"),
    ("cond-kind", "conditioning.kind", "image", "conditioning.kind"),
    ("context-dim-huge", "conditioning.context_dim", 10**9, "conditioning.context_dim"),
    ("context-dim-negative", "conditioning.context_dim", -1, "conditioning.context_dim"),
    ("labels-type", "conditioning.label_names", "a,b", "conditioning.label_names"),
    ("labels-too-many", "conditioning.label_names", ["x"] * 9, "conditioning.label_names"),
    ("labels-empty-name", "conditioning.label_names", ["", "b"], "conditioning.label_names"),
    ("graphs-empty", "graphs", {}, "graphs: must hold 1-32 graphs"),
    ("graphs-no-unet", "graphs", {"other": None}, "graphs.other"),
    ("graph-file-type", "graphs.unet.file", 7, "graphs.unet.file"),
    ("graph-inputs-type", "graphs.unet.inputs", "x", "graphs.unet.inputs"),
    ("tensor-dtype", "graphs.unet.inputs.0.dtype", "float64", "graphs.unet.inputs[0].dtype"),
    ("tensor-shape", "graphs.unet.inputs.0.shape", [[1]], "graphs.unet.inputs[0].shape"),
    ("tensor-name", "graphs.unet.inputs.0.name", "../x", "graphs.unet.inputs[0].name"),
    ("unet-spec", "graphs.unet.inputs.0.shape", ["batch", 3, 8, 16], "must agree with image"),
    ("unet-input-renamed", "graphs.unet.inputs.1.name", "time", "expected 't'"),
    ("files-empty", "files", {}, "files: must list 1-64 files"),
    ("files-type", "files", [], "files: must be an object"),
    ("sha-short", "files.unet.onnx.sha256", "abc", "files.unet.onnx.sha256"),
    ("sha-upper", "files.unet.onnx.sha256", "A" * 64, "files.unet.onnx.sha256"),
    ("bytes-missing", "files.unet.onnx.bytes", _DELETE, "files.unet.onnx.bytes: missing"),
    ("bytes-string", "files.unet.onnx.bytes", "100", "files.unet.onnx.bytes"),
    ("bytes-huge", "files.unet.onnx.bytes", 2**40, "files.unet.onnx.bytes"),
    ("bytes-zero", "files.unet.onnx.bytes", 0, "files.unet.onnx.bytes"),
]


def _set_path(m: dict, path: str, value):
    # "files.unet.onnx.sha256": the file name holds a dot
    path = path.replace("unet.onnx", "unet\0onnx")
    parts = [p.replace("\0", ".") for p in path.split(".")]
    obj = m
    for k in parts[:-1]:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    last = parts[-1]
    if value is _DELETE:
        del obj[last]
    elif isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


@pytest.mark.parametrize(
    "path,value,match",
    [c[1:] for c in MANIFEST_CASES],
    ids=[f"manifest-{c[0]}" for c in MANIFEST_CASES],
)
def test_mistyped_or_out_of_range_field(good, path, value, match):
    m = read_manifest(good)
    if value == "NaN":  # JSON's non-standard constant, written raw
        _set_path(m, path, 0.5)
        text = json.dumps(m).replace('"beta_start": 0.5', '"beta_start": NaN')
        (good / "manifest.json").write_text(text)
    else:
        _set_path(m, path, value)
        write_manifest(good, m)
    with pytest.raises(BundleError) as e:
        Generator(good)
    assert match in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"{not json", "corrupt"),
        (b"", "corrupt"),
        (b"[1, 2]", "manifest: must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "corrupt"),
        (b"\xff\xfe{}", "corrupt"),
        (b'{"schema_version": 1, "image": Infinity}', "corrupt"),
        (b" " * (5 * 2**20), "over the limit"),
    ],
    ids=[
        "manifest-not-json",
        "manifest-empty",
        "manifest-array",
        "manifest-deep-nesting",
        "manifest-not-utf8",
        "manifest-infinity",
        "manifest-huge",
    ],
)
def test_corrupt_manifest_bytes(good, content, match):
    (good / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match=match):
        Bundle.load(good)


def test_manifest_unknown_optional_fields_are_ignored(good):
    """New optional fields must not break older runtimes (forward compatibility)."""
    m = read_manifest(good)
    m["future_field"] = {"anything": [1, 2, 3]}
    m["image"]["color_space"] = "srgb"
    m["requires"] = []
    write_manifest(good, m)
    Generator(good).generate("thing 1", **GEN)


def test_todays_shipped_manifest_keeps_loading():
    """A frozen copy of the manifest shipped on 2026-11-29 (schema 1, no ``requires``)."""
    frozen = json.loads((Path(__file__).parent / "golden" / "manifest_2026-11-29.json").read_text())
    validate_manifest(frozen)


# -- paths ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["../outside.onnx", "/etc/passwd", "sub/unet.onnx", ".hidden", "a\\b", "", "x" * 200, "é.onnx"],
    ids=[
        "path-dotdot",
        "path-absolute",
        "path-subfolder",
        "path-hidden",
        "path-backslash",
        "path-empty",
        "path-long",
        "path-non-ascii",
    ],
)
def test_manifest_paths_must_be_plain_names(good, name):
    m = read_manifest(good)
    m["files"][name] = m["files"].pop("unet.onnx")
    m["graphs"]["unet"]["file"] = name
    write_manifest(good, m)
    with pytest.raises(BundleError, match="not a plain file name inside the bundle"):
        Bundle.load(good)


def test_path_symlink_leading_out_is_refused(good, tmp_path):
    """Even with a matching hash: the loader must not read (or reveal) files outside."""
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(good / "unet.onnx", outside)
    os.symlink(outside, good / "unet.onnx")
    with pytest.raises(BundleError, match="leads outside the bundle folder"):
        Bundle.load(good)
    # a symlink inside the bundle is fine
    (good / "unet.onnx").unlink()
    shutil.move(outside, good / "real.onnx")
    os.symlink("real.onnx", good / "unet.onnx")
    Bundle.load(good)


def test_path_manifest_symlink_leading_out_is_refused(good, tmp_path):
    shutil.move(good / "manifest.json", tmp_path / "m.json")
    os.symlink(tmp_path / "m.json", good / "manifest.json")
    with pytest.raises(BundleError, match="leads outside"):
        Bundle.load(good)


def test_path_fifo_is_refused_without_blocking(good):
    (good / "unet.onnx").unlink()
    os.mkfifo(good / "unet.onnx")
    with pytest.raises(BundleError, match="not a regular file"):
        Bundle.load(good)


def test_path_folder_in_place_of_a_file(good):
    (good / "unet.onnx").unlink()
    (good / "unet.onnx").mkdir()
    with pytest.raises(BundleError, match="not a regular file"):
        Bundle.load(good)


# -- files ------------------------------------------------------------------------------
def test_file_flipped_bit(good):
    data = bytearray((good / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (good / "unet.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        Generator(good)
    with pytest.raises(BundleError, match="does not match its sha256"):
        Bundle.load(good)  # hash_all, as info does


def test_file_truncated(good):
    data = (good / "unet.onnx").read_bytes()
    (good / "unet.onnx").write_bytes(data[:-10])
    with pytest.raises(BundleError, match=r"has \d+ bytes, the manifest says"):
        Bundle.load(good, hash_all=False)


def test_file_missing(good):
    (good / "unet.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(good, hash_all=False)


def test_file_huge_sparse_is_refused_before_hashing(good):
    """A 64 GiB sparse file: refused on its size at once, never read."""
    with open(good / "unet.onnx", "r+b") as f:
        f.truncate(64 * 2**30)
    with pytest.raises(BundleError, match="bytes, the manifest says"):
        Bundle.load(good)
    with pytest.raises(BundleError, match="bytes, the manifest says"):
        Generator(good)


def test_file_swapped_after_load_is_not_used(good):
    """Hash-then-load gap: the graph is hashed over the bytes handed to ONNX Runtime."""
    b = Bundle.load(good)  # every file hashed here
    other = unet_graph(4, scale=0.5)
    (good / "unet.onnx").write_bytes(other)
    with pytest.raises(BundleError, match="sha256"):
        Generator(b)


def test_file_modified_while_it_is_loaded(good):
    """Hash, then load through the same descriptor: a write in between is caught."""
    b = Bundle.load(good)
    with pytest.raises(BundleError, match="was modified while it was loaded"):
        with b.open_verified("unet.onnx") as source:
            assert isinstance(source, str) and source.startswith(("/proc/self/fd/", "/dev/fd/"))
            with open(good / "unet.onnx", "ab") as f:
                f.write(b"\0")


def test_file_swapped_by_rename_while_loading_is_not_what_loads(tmp_path):
    """The loader reads the verified inode, never the swapped-in file; the swap itself
    (unlinking the old inode changes its ctime) is then reported."""
    b = Bundle.load(write_bundle(tmp_path / "fresh"))
    evil = unet_graph(4, scale=0.5)
    with pytest.raises(BundleError, match="was modified while it was loaded"):
        with b.open_verified("unet.onnx") as source:
            (b.path / "unet.onnx.new").write_bytes(evil)
            os.replace(b.path / "unet.onnx.new", b.path / "unet.onnx")
            with open(source, "rb") as f:  # what a loader opening the given path reads
                assert f.read() != evil


# -- graphs that disagree with the manifest (re-signed, so every hash matches) ---------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"in_names": ("y", "t", "c")}, "input is named 'y', expected 'x'"),
        ({"out_shape": [1, 1, 1, 1], "declared_out": ["batch", 3, 8, 8]}, "output 'eps' has shape"),
        ({"declared_out": ["batch", 1, 1, 1], "out_shape": [1, 1, 1, 1]}, "output 'eps' has shape"),
    ],
    ids=["graph-renamed-input", "graph-wrong-output-shape", "graph-declared-wrong-output"],
)
def test_graph_io_checked_when_the_session_is_created(good, kwargs, match):
    (good / "unet.onnx").write_bytes(unet_graph(4, **kwargs))
    rehash(good, "unet.onnx")
    with pytest.raises(BackendError, match=match):
        Generator(good)


def test_graph_wrong_context_dim(good):
    (good / "unet.onnx").write_bytes(unet_graph(5))
    rehash(good, "unet.onnx")
    with pytest.raises(BackendError, match="'c' has shape"):
        Generator(good)


def test_graph_not_onnx(good):
    (good / "unet.onnx").write_bytes(b"\x00garbage" * 100)
    rehash(good, "unet.onnx")
    with pytest.raises(BackendError, match="cannot load graph 'unet'"):
        Generator(good)


def test_graph_text_encoder_wrong_output(tmp_path, tokenizer_bytes):
    b = write_bundle(tmp_path / "t", text=text_graph(8, out_dim=1), tokenizer=tokenizer_bytes)
    with pytest.raises(BackendError, match="output 'embedding' has shape"):
        Generator(b)


def test_graph_outputs_checked_every_run():
    """A backend whose graph returns the wrong shape or dtype at run time is caught."""
    spec = unet_io(3, 8, 8, 4)
    feeds = {"x": np.zeros((2, 3, 8, 8), np.float32)}
    assert check_outputs(spec, feeds, {"eps": np.zeros((2, 3, 8, 8), np.float32)}) is None
    assert "shape" in check_outputs(spec, feeds, {"eps": np.zeros((2, 1, 1, 1), np.float32)})
    assert "shape" in check_outputs(spec, feeds, {"eps": np.zeros((1, 3, 8, 8), np.float32)})
    assert "dtype" in check_outputs(spec, feeds, {"eps": np.zeros((2, 3, 8, 8), np.float64)})
    assert "no output" in check_outputs(spec, feeds, {"other": np.zeros(1)})


# -- numbers --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad,below,match",
    [
        (NAN, 2.0, "step 1/6 (t=20) is NaN"),
        (INF, 2.0, "step 1/6 (t=20) is Inf"),
        (1e30, 2.0, "step 1/6 (t=20) is 1e+30"),
        (NAN, 0.4, "step 5/6 (t=7) is NaN"),
        (-1e5, 0.4, "step 5/6 (t=7) is 1e+05"),
    ],
    ids=[
        "numeric-unet-nan",
        "numeric-unet-inf",
        "numeric-unet-huge",
        "numeric-unet-nan-late",
        "numeric-unet-large-late",
    ],
)
def test_non_finite_unet_output_is_an_error_naming_the_step(good, bad, below, match):
    (good / "unet.onnx").write_bytes(unet_graph(4, bad_value=bad, bad_below_t=below))
    rehash(good, "unet.onnx")
    gen = Generator(good)
    for guidance in (1.0, 2.0):  # plain and guided (Inf must not be reported as Inf - Inf)
        with pytest.raises(NumericalError, match=re.escape(match)) as e:
            gen.generate("thing 1", guidance=guidance, **GEN)
        assert "backend ort, U-Net precision fp32" in str(e.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bad_value": NAN}, "norm nan"),
        ({"bad_value": INF}, "norm inf"),
        ({"norm": 2.0}, "norm 2"),
        ({"norm": 1e30}, "norm 1e\\+30"),
        ({"norm": 0.0}, "norm 0"),
    ],
    ids=[
        "numeric-text-nan",
        "numeric-text-inf",
        "numeric-text-norm2",
        "numeric-text-huge",
        "numeric-text-zero",
    ],
)
def test_text_encoder_output_must_be_unit_length(tmp_path, tokenizer_bytes, kwargs, match):
    b = write_bundle(tmp_path / "t", text=text_graph(8, **kwargs), tokenizer=tokenizer_bytes)
    gen = Generator(b)
    with pytest.raises(NumericalError, match=match):
        gen.generate("a red circle", **GEN)
    gen.generate("", **GEN)  # the null context never runs the encoder


def test_numeric_healthy_text_bundle_generates(tmp_path, tokenizer_bytes):
    b = write_bundle(tmp_path / "t", text=text_graph(8), tokenizer=tokenizer_bytes)
    img = Generator(b).generate("a red circle", **GEN)
    assert img.shape == (2, 8, 8, 3)


# -- external data ----------------------------------------------------------------------
def test_external_data_is_refused(good, tmp_path):
    """A graph whose weights live in another file (even a listed, hashed one) is refused."""
    model = onnx.load_from_string(unet_graph(4, scale=0.25))
    # move the scale constant into an initializer, stored as external data
    node = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == "k")
    model.graph.node.remove(node)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(0.25), "k"))
    onnx.save_model(
        model,
        tmp_path / "m.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    shutil.copy(tmp_path / "m.onnx", good / "unet.onnx")
    shutil.copy(tmp_path / "weights.bin", good / "weights.bin")
    m = read_manifest(good)
    m["files"]["unet.onnx"] = file_entry((good / "unet.onnx").read_bytes())
    m["files"]["weights.bin"] = file_entry((good / "weights.bin").read_bytes())
    write_manifest(good, m)
    # and a copy in the working directory, where a bytes-loaded graph would look
    cwd = os.getcwd()
    os.chdir(good)
    try:
        with pytest.raises(BackendError, match="external data files, which bundles may not use"):
            Generator(good)
    finally:
        os.chdir(cwd)


# -- pinned digest ------------------------------------------------------------------------
def test_digest_pins_the_manifest_fields(good):
    digest = Bundle.load(good).digest
    Generator(good, expected_digest=digest)
    m = read_manifest(good)
    m["schedule"]["beta_end"] = 0.021  # changes no file hash
    write_manifest(good, m)
    Generator(good)  # valid, but no longer the pinned bundle
    with pytest.raises(BundleError, match="not the expected"):
        Generator(good, expected_digest=digest)
    with pytest.raises(InputError, match="64 lowercase hex"):
        Generator(good, expected_digest="abc")


def test_digest_cli(good, tmp_path):
    info = run_cli("info", str(good))
    digest = next(ln.split()[1] for ln in info.stdout.splitlines() if ln.startswith("digest"))
    assert digest == Bundle.load(good).digest
    out = tmp_path / "a.png"
    run_cli(
        "--model",
        str(good),
        "--prompt",
        "thing 1",
        "--expect-digest",
        digest,
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--out",
        str(out),
        "--no-progress",
    )
    proc = run_cli(
        "--model",
        str(good),
        "--prompt",
        "thing 1",
        "--expect-digest",
        "0" * 64,
        "--out",
        str(tmp_path / "b.png"),
        check=False,
    )
    assert proc.returncode == 1 and "not the expected" in proc.stderr
    assert not (tmp_path / "b.png").exists()


# -- the CLI: info and generate refuse the same bundles, one line each -----------------
@pytest.mark.parametrize("command", ["generate", "info", "bench"])
def test_cli_refuses_a_crafted_bundle_like_generate(good, tmp_path, command):
    (good / "unet.onnx").write_bytes(unet_graph(4, in_names=("y", "t", "c")))
    rehash(good, "unet.onnx")
    args = {
        "generate": ["--model", str(good), "--prompt", "thing 1", "--out", str(tmp_path / "a.png")],
        "info": ["info", str(good)],
        "bench": ["bench", str(good)],
    }[command]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: graph 'unet' (unet.onnx) does not match the bundle's I/O spec: "
        "input is named 'y', expected 'x'"
    ]
    assert list(tmp_path.iterdir()) == [good]


def test_bench_runs_on_a_bundle_with_few_timesteps(tmp_path):
    b = write_bundle(tmp_path / "b", timesteps=7)
    proc = run_cli("bench", str(b), "--batch-sizes", "1,2", "--repeats", "2", "--no-compile")
    assert "ddim-50" not in proc.stdout and "ddpm-7" in proc.stdout
    assert "cannot rebuild the torch U-Net" in proc.stdout  # no model config: skipped


def test_every_error_is_a_project_error():
    for cls in (BundleError, BackendError, InputError, NumericalError):
        assert issubclass(cls, DdpmRtError)


def test_optimised_graph_cache_is_keyed_checked_and_exact(good, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path / "cache"))
    first = Generator(good).generate("thing 1", **GEN)
    entries = sorted((tmp_path / "cache" / "ort").glob("*.onnx"))
    assert len(entries) == 1  # the U-Net (a label bundle has no text encoder)
    second = Generator(good).generate("thing 1", **GEN)  # from the cache
    np.testing.assert_array_equal(first, second)
    entries[0].write_bytes(entries[0].read_bytes()[:-8] + b"tampered")  # ignored, rewritten
    np.testing.assert_array_equal(Generator(good).generate("thing 1", **GEN), first)
    data = bytearray((good / "unet.onnx").read_bytes())  # the bundle is still verified
    data[len(data) // 2] ^= 1
    (good / "unet.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Generator(good)


def test_optimised_graph_cache_entry_replaced_by_another_graph(good, tmp_path, monkeypatch):
    """A cached optimised graph replaced by another *valid* graph (the optimised form of a
    U-Net that computes something else, written over the entry: same inode, same size, new
    mtime) is never what runs: the verified graph's images come out. (Corrupting the entry
    into invalid protobuf would only test the load fallback, not the entry's check.)"""
    from ddpm_rt.backends import ort_cache

    monkeypatch.setenv("DDPM_RT_CACHE", str(tmp_path / "cache"))
    cpu = ["CPUExecutionProvider"]
    first = Generator(good).generate("thing 1", **GEN)
    other = write_bundle(tmp_path / "other", unet=unet_graph(4, scale=0.5))
    theirs = Generator(other).generate("thing 1", **GEN)
    assert not np.array_equal(first, theirs)
    mine, _ = ort_cache.entry(read_manifest(good)["files"]["unet.onnx"]["sha256"], cpu)
    swap, _ = ort_cache.entry(read_manifest(other)["files"]["unet.onnx"]["sha256"], cpu)
    assert mine.is_file() and swap.is_file() and mine != swap
    data = swap.read_bytes()
    assert data != mine.read_bytes()
    with open(mine, "r+b") as f:  # in place: the inode stays
        f.truncate(0)
        f.write(data)
    np.testing.assert_array_equal(Generator(good).generate("thing 1", **GEN), first)
    # and the entry was rewritten from the verified graph
    np.testing.assert_array_equal(Generator(good).generate("thing 1", **GEN), first)


def test_file_grown_after_load_is_refused_before_hashing(good):
    """Between loading the manifest (sizes checked) and opening a graph, the file grows (a
    256 MiB sparse file): refused on the open descriptor's size, before a byte is hashed --
    the error is the size, not the sha256 a hash over the grown file would give."""
    b = Bundle.load(good, hash_all=False)
    with open(good / "unet.onnx", "r+b") as f:
        f.truncate(256 * 2**20)
    with pytest.raises(BundleError, match="bytes, the manifest says"):
        Generator(b)


def test_graph_outputs_checked_on_every_run_of_a_real_session(good):
    """A graph whose declared outputs match the spec (so the session is accepted) but whose
    run-time output has twice the batch: refused by the run's output check, naming it."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Concat", ["x", "x"], ["eps"], axis=0),  # (2B, 3, 8, 8) at run time
        helper.make_node("ReduceSum", ["c"], ["c_used"], keepdims=1),
        helper.make_node("ReduceSum", ["t"], ["t_used"], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "unet",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["batch", 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (good / "unet.onnx").write_bytes(model.SerializeToString())
    rehash(good, "unet.onnx")
    gen = Generator(good)  # the declared I/O agrees with the spec
    with pytest.raises(BackendError, match=r"returned output 'eps' of shape \(4, 3, 8, 8\)"):
        gen.generate("thing 1", **{**GEN, "guidance": 1.0})
