"""Protections the README promises, each tested so that the test fails without it: every file
the CLI writes needs --force to be replaced (reached one file at a time), settings out of
range are refused before work, the U-Net precision asked for is the graph that runs, and the
manifest validator accepts exactly what the documented limits allow.

scripts/mutation_check.py breaks each of these in turn and checks that these tests notice.
"""

from __future__ import annotations

import functools
import json
import math
import operator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from craft import write_bundle
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ddpm_rt import Generator
from ddpm_rt.errors import InputError

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"


# -- --force for every file written --------------------------------------------------------
@pytest.fixture(scope="module")
def label_bundle(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("force") / "b")


def _generate(bundle: Path, folder: Path, *extra: str):
    return run_cli(
        "--model",
        str(bundle),
        "--prompt",
        "thing 1",
        *"--num 2 --sampler ddim --steps 4 --preview-every 2 --no-progress".split(),
        "--out",
        str(folder / "a.png"),
        "--trajectory",
        str(folder / "t.gif"),
        *extra,
        check=False,
    )


OUTPUTS = ("a.png", "a.step0002.png", "a.step0004.png", "t.gif")


@pytest.mark.parametrize("existing", OUTPUTS)
def test_every_output_needs_force_to_be_replaced(label_bundle, tmp_path, existing):
    """Only one of the run's outputs exists, so each guard is the one that must refuse (a
    test where --out exists is refused before the preview and trajectory guards are reached)."""
    (tmp_path / existing).write_bytes(b"keep me")
    proc = _generate(label_bundle, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (
        f"error: {tmp_path / existing} exists; pass --force to replace it"
    ), proc.stderr
    # refused before any work: the file kept, nothing else written
    assert (tmp_path / existing).read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    # with --force every output is written, the existing one replaced
    proc = _generate(label_bundle, tmp_path, "--force")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUTS)
    assert (tmp_path / existing).read_bytes() != b"keep me"
    with Image.open(tmp_path / existing) as im:
        im.load()


# -- bounds --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting,value",
    [
        ("guidance", float("nan")),
        ("guidance", -0.5),
        ("guidance", 50.5),
        ("eta", 1.5),
        ("num", 0),
        ("steps", 0),
        ("seed", -1),
    ],
)
def test_settings_out_of_range_are_refused_before_work(label_bundle, tmp_path, setting, value):
    """The API refuses before the U-Net runs (a backend that counts calls sees none); the
    CLI refuses with one line before it loads the model (the bundle path does not exist)."""
    from conftest import CountingBackend

    gen = Generator(label_bundle)
    gen.backend = CountingBackend(gen.backend)
    with pytest.raises(InputError, match=setting):
        gen.generate("thing 1", sampler="ddim", **{setting: value})
    assert gen.backend.runs == {}
    gen.generate("thing 1", sampler="ddim", steps=2)  # the same generator still works
    assert gen.backend.runs
    flag = f"--{setting}"
    proc = run_cli(
        "--model",
        str(tmp_path / "absent"),
        "--prompt",
        "x",
        "--sampler",
        "ddim",
        flag,
        str(value),
        "--out",
        str(tmp_path / "o.png"),
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and setting in lines[0], lines
    assert not (tmp_path / "o.png").exists()


def test_png_over_the_pixel_limit_is_refused_before_work(label_bundle, tmp_path):
    """289 images of 8x8 as a 17x17 grid at --scale 64 is a 9,856-pixel square (97 M pixels,
    over Pillow's 89 M limit, yet small in memory): refused with one line before the model
    loads; nothing written. (At --num 100,000 the memory check would refuse it first.)"""
    out = tmp_path / "a.png"
    args = ["--model", str(label_bundle), "--prompt", "thing 1", "--out", str(out)]
    proc = run_cli(*args, *"--num 289 --scale 64 --sampler ddim --steps 2".split(), check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "over the limit of 89 M pixels" in proc.stderr
    assert list(tmp_path.iterdir()) == []
    # just under the limit it runs (scale 57: 8,778 pixels square, 77 M)
    proc = run_cli(*args, *"--num 289 --scale 57 --sampler ddim --steps 2".split(), check=False)
    assert proc.returncode == 0, proc.stderr


# -- precision selection -------------------------------------------------------------------
def _unet_inputs(gen: Generator):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *gen.bundle.sample_shape)).astype(np.float32)
    c = np.stack([gen.context("red apple"), gen.context("a happy dog")])
    return x, c


def _run_graph_file(path: Path, x, t, c) -> np.ndarray:
    """The oracle: ONNX Runtime on the variant's file directly, not through the runtime."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tt = np.full((len(x), 1), t / 500, dtype=np.float32)
    return sess.run(["eps"], {"x": x, "t": tt, "c": c})[0]


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_unet_precision_selects_the_graph(precision):
    """unet_precision= runs the variant's graph: its eps is the variant file's own output
    (run here by ONNX Runtime directly), not fp32's -- compared as numbers, not PNG bytes."""
    fp32 = Generator(DEFAULT, unet_precision="fp32")
    variant = Generator(DEFAULT, unet_precision=precision)
    assert variant.unet_precision == precision
    x, c = _unet_inputs(fp32)
    t = 250
    file = DEFAULT / variant.bundle.graphs[variant.bundle.unet_precisions[precision]].file
    want = _run_graph_file(file, x, t, c)
    want_fp32 = _run_graph_file(DEFAULT / "unet.onnx", x, t, c)
    got = variant.eps(x, t, c)
    # the two graphs really differ here, by far more than a run-to-run difference
    assert np.abs(want - want_fp32).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fp32.eps(x, t, c), want_fp32, rtol=1e-5, atol=1e-5)


def test_cli_unet_precision_is_the_one_that_ran(tmp_path):
    """The CLI's --unet-precision int8 gives the API's int8 pixels, not fp32's, and says so
    in the PNG's provenance."""
    kw = {"num": 2, "seed": 3, "sampler": "ddim", "steps": 4, "eta": 0.0}
    paths = {}
    for precision in ("fp32", "int8"):
        paths[precision] = tmp_path / f"{precision}.png"
        run_cli(
            "--prompt",
            "red apple",
            *(a for k, v in kw.items() for a in (f"--{k}", str(v))),
            "--unet-precision",
            precision,
            "--out",
            str(paths[precision]),
            "--no-progress",
        )
    api = {
        p: Generator(DEFAULT, unet_precision=p).generate("red apple", **kw)
        for p in ("fp32", "int8")
    }
    assert not np.array_equal(api["fp32"], api["int8"])
    h = api["fp32"].shape[1]  # the shipped cascade's 64
    for p, path in paths.items():
        grid = np.asarray(Image.open(path))
        np.testing.assert_array_equal(grid[1 : h + 1, 1 : h + 1], api[p][0])
        np.testing.assert_array_equal(grid[1 : h + 1, h + 2 : 2 * h + 2], api[p][1])
        info = json.loads(run_cli("info", str(path)).stdout)
        assert info["unet_precision"] == p


# -- the manifest validator against an oracle (a validator accepting or rejecting everything
# would pass a test that only asks "a BundleError or a valid result") ---------------------------
def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


# field -> whether a value is valid, from README's limits and docs/bundle-format.md (the base
# manifest's other fields held fixed: beta_start 1e-4, beta_end 0.02)
ORACLE = {
    ("schema_version",): lambda v: type(v) is int and v == 1,  # newer: "upgrade ddpm-rt"
    ("schedule", "timesteps"): lambda v: type(v) is int and 1 <= v <= 10_000,
    ("schedule", "beta_start"): lambda v: _number(v) and 0 < v < 1 and v <= 0.02,
    ("schedule", "beta_end"): lambda v: _number(v) and 0 < v < 1 and v >= 1e-4,
    ("files", "unet.onnx", "bytes"): lambda v: type(v) is int and 1 <= v <= 2**31 - 1,
}
VALUES = (
    st.integers(-3, 12_000)
    | st.integers(2**31 - 3, 2**31 + 3)
    | st.floats(-1.5, 1.5)
    | st.floats()
    | st.booleans()
    | st.none()
    | st.text(max_size=3)
    | st.sampled_from([1, 1.0, 1e-4, 0.02, 0.0200001, 10_000, 10_001, 0, 2**31 - 1])
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(field=st.sampled_from(sorted(ORACLE)), value=VALUES)
def test_manifest_validator_agrees_with_the_documented_limits(field, value):
    from ddpm_rt.bundle.manifest import validate_manifest
    from ddpm_rt.errors import BundleError

    m = json.loads(BASE_MANIFEST)
    functools.reduce(operator.getitem, field[:-1], m)[field[-1]] = value
    try:
        validate_manifest(m)
        accepted = True
    except BundleError as e:
        accepted = False
        assert "\n" not in str(e) and (field[-1] in str(e) or "upgrade" in str(e)), str(e)
    assert accepted == ORACLE[field](value), (field, value)


BASE_MANIFEST = (ROOT / "tests" / "golden" / "manifest_2026-11-29.json").read_text()
