"""Hostile arguments: API calls and CLI flags. A clear project error or a valid image, never
anything else -- and the CLI refuses bad input before it loads any model.

Test ids start with the defect class (``api-``, ``cli-``, ``property-``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from craft import text_graph, write_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddpm_rt import Bundle, GenerateConfig, Generator
from ddpm_rt.bundle.manifest import validate_manifest
from ddpm_rt.errors import BundleError, DdpmRtError, InputError

from conftest import run_cli

GEN = {"sampler": "ddim", "steps": 3}


@pytest.fixture(scope="module")
def label_bundle(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("hostile") / "b")


@pytest.fixture(scope="module")
def gen(label_bundle) -> Generator:
    return Generator(label_bundle)


@pytest.fixture(scope="module")
def text_gen(tmp_path_factory, tiny_text) -> Generator:
    b = write_bundle(
        tmp_path_factory.mktemp("hostile_text") / "b",
        text=text_graph(8),
        tokenizer=(tiny_text / "tokenizer.json").read_bytes(),
    )
    return Generator(b)


# -- API argument types and ranges ------------------------------------------------------
API_CASES = [
    (
        "prompt-int",
        {"prompt": 123},
        "prompt must be a string or a non-empty list of strings, got int",
    ),
    ("prompt-bytes", {"prompt": b"thing 1"}, "got bytes"),
    ("prompt-surrogate", {"prompt": "thing \udc80"}, "not valid Unicode text"),
    ("prompt-huge", {"prompt": "a" * 20_000}, "over the limit"),
    ("num-str", {"num": "2"}, "num must be an integer, got str"),
    ("num-float", {"num": 2.0}, "num must be an integer"),
    ("num-bool", {"num": True}, "num must be an integer, got bool"),
    ("num-zero", {"num": 0}, "num must be between 1"),
    ("num-huge", {"num": 10**7}, "num must be between 1 and 100000"),
    ("steps-float", {"steps": 5.5}, "steps must be an integer"),
    ("sampler-int", {"sampler": 3}, "unknown sampler 3"),
    ("ddpm-eta", {"sampler": "ddpm", "steps": None, "eta": 0.5}, "eta applies to ddim only"),
    ("steps-too-many", {"steps": 21}, "ddim steps must be between 1 and 20"),
    ("guidance-str", {"guidance": "2"}, "guidance must be a number, got str"),
    ("guidance-nan", {"guidance": float("nan")}, "guidance must be a finite number"),
    ("guidance-inf", {"guidance": float("inf")}, "guidance must be a finite number"),
    ("guidance-negative", {"guidance": -1.0}, "guidance must be a finite number between 0"),
    ("guidance-huge", {"guidance": 1e6}, "between 0 and 50"),
    ("eta-inf", {"eta": float("inf")}, "eta must be a finite number between 0 and 1"),
    ("eta-two", {"eta": 2.0}, "eta must be a finite number between 0 and 1"),
    ("eta-str", {"eta": "1"}, "eta must be a number"),
    ("seed-negative", {"seed": -1}, "seed must be between 0"),
    ("seed-huge", {"seed": 2**64}, "seed must be between 0"),
    ("seed-float", {"seed": 1.5}, "seed must be an integer"),
    ("batch-zero", {"batch_size": 0}, "batch size must be between 1"),
    ("sampler-int", {"sampler": 3}, "unknown sampler"),
    ("sampler-unknown", {"sampler": "euler"}, "unknown sampler 'euler'"),
    ("unknown-kwarg", {"nmu": 2}, "unknown argument(s) nmu"),
    ("config-type", {"config": {"num": 2}}, "config must be a GenerateConfig"),
    ("negative-int", {"negative_prompt": 5, "guidance": 2.0}, "negative prompt must be a string"),
    (
        "negative-without-guidance",
        {"negative_prompt": "thing 2", "guidance": 1.0},
        "set guidance != 1",
    ),
    (
        "context-and-prompt",
        {"context": np.zeros(4, np.float32)},
        "exactly one of prompt or context",
    ),
    ("unknown-label", {"prompt": "thing 99"}, "unknown prompt 'thing 99'"),
    (
        "blend-overflow",
        {"prompt": "thing 1:" + "9" * 400 + " | thing 2:1"},
        "must be between 0 and 1e+06",
    ),
    ("blend-negative", {"prompt": "thing 1:-1 | thing 2:1"}, "blend weight -1"),
    ("blend-empty", {"prompt": "thing 1 | "}, "empty part"),
]


@pytest.mark.parametrize(
    "kwargs", [c[1] for c in API_CASES], ids=[f"api-{c[0]}" for c in API_CASES]
)
def test_api_arguments_are_checked(gen, kwargs, request):
    match = next(c[2] for c in API_CASES if c[1] is kwargs)
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "thing 1")
    with pytest.raises(InputError) as e:
        gen.generate(prompt, **{**GEN, **kwargs})
    assert match in str(e.value), str(e.value)


CONTEXT_CASES = [
    ("nan", np.full(4, np.nan), "NaN or Inf"),
    ("inf", np.array([np.inf, 0, 0, 0]), "NaN or Inf"),
    ("huge", np.full(4, 1e30), "within +-1000"),
    ("shape", np.zeros(5), "shape (4,) or (N, 4)"),
    ("rank", np.zeros((1, 1, 4)), "shape (4,) or (N, 4)"),
    ("rows", np.zeros((3, 4)), "(4,) or (2, 4)"),
    ("str", "red", "numeric array, got str"),
    ("object", np.array([None] * 4), "numeric array"),
    ("none-list", [None, 1, 2, 3], "numeric array"),
]


@pytest.mark.parametrize(
    "ctx,match", [c[1:] for c in CONTEXT_CASES], ids=[f"api-context-{c[0]}" for c in CONTEXT_CASES]
)
def test_api_contexts_are_checked(gen, ctx, match):
    with pytest.raises(InputError) as e:
        gen.generate(context=ctx, num=2, **GEN)
    assert match in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "ctx,ok",
    [
        (np.zeros(8), True),  # the null context
        (np.eye(8)[2], True),
        (np.eye(8)[2] * 1.005, True),  # within CONTEXT_NORM_ATOL
        (np.eye(8)[2] * 1.5, False),
        (np.full(8, 1e-3), False),
    ],
    ids=[
        "api-text-context-null",
        "api-text-context-unit",
        "api-text-context-near-unit",
        "api-text-context-long",
        "api-text-context-short",
    ],
)
def test_api_text_contexts_are_unit_or_zero(text_gen, ctx, ok):
    if ok:
        assert text_gen.generate(context=ctx, **GEN).shape == (1, 8, 8, 3)
    else:
        with pytest.raises(InputError, match="unit length"):
            text_gen.generate(context=ctx, **GEN)


def test_api_constructor_arguments(label_bundle):
    with pytest.raises(InputError, match="providers must be a list"):
        Generator(label_bundle, providers="CPUExecutionProvider")
    with pytest.raises(InputError, match="not available: NopeExecutionProvider"):
        Generator(label_bundle, providers=["NopeExecutionProvider"])
    with pytest.raises(InputError, match="bundle must be a folder path, got int"):
        Generator(42)
    with pytest.raises(InputError, match="unknown backend"):
        Generator(label_bundle, backend="trt2")
    with pytest.raises(InputError, match="text-conditioned bundles only"):
        Generator(label_bundle, text_precision="int8")


def test_api_context_returns_a_copy(text_gen):
    v = text_gen.context("a red circle")
    v[:] = 0
    assert np.linalg.norm(text_gen.context("a red circle")) == pytest.approx(1.0, abs=1e-3)


def test_api_memory_is_refused_up_front_with_the_estimate(tmp_path, monkeypatch):
    import ddpm_rt.config as config

    monkeypatch.setattr(config, "memory_limit", lambda: 10 * 2**20)  # a 10 MiB device
    gen = Generator(write_bundle(tmp_path / "b"))
    with pytest.raises(
        InputError, match=r"100000 images needs about \d+ MiB, over the limit of 10 MiB"
    ):
        gen.generate("thing 1", num=100_000, **GEN)


# -- CLI: flags and output paths are checked before the model is loaded -----------------
def _cli(*args, tmp_path: Path):
    return run_cli(*args, check=False)


CLI_CASES = [
    ("guidance-nan", ["--guidance", "nan"], "guidance must be a finite number"),
    ("eta-inf", ["--sampler", "ddim", "--eta", "inf"], "eta must be a finite number"),
    ("num-huge", ["--num", "10000000"], "num must be between 1 and 100000"),
    ("scale-zero", ["--scale", "0"], "scale must be an integer between 1 and 64"),
    ("scale-huge", ["--scale", "100000"], "scale must be an integer between 1 and 64"),
    ("out-proc", ["--out", "/proc/a.png"], "on the proc pseudo-filesystem"),
    ("out-sys", ["--out", "/sys/a.png"], "on the sysfs pseudo-filesystem"),
    ("out-missing-folder", ["--out", "/nonexistent/a.png"], "output folder does not exist"),
    ("out-not-png", ["--out", "a.jpg"], "must be a .png file"),
    ("digest-bad", ["--expect-digest", "xyz"], "--expect-digest must be 64 hex digits"),
    ("providers-empty", ["--providers", "CPUExecutionProvider,"], "--providers has an empty name"),
    ("negative-no-guidance", ["--negative-prompt", "x", "--guidance", "1"], "set guidance != 1"),
]


@pytest.mark.parametrize(
    "extra,match", [c[1:] for c in CLI_CASES], ids=[f"cli-{c[0]}" for c in CLI_CASES]
)
def test_cli_flags_checked_before_the_model_loads(tmp_path, extra, match):
    """The bundle named here does not exist: the flag error must come first."""
    args = ["--model", str(tmp_path / "no-such-bundle"), "--prompt", "x"]
    if "--out" not in extra:
        args += ["--out", str(tmp_path / "a.png")]
    proc = run_cli(*args, *extra, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert match in proc.stderr and "bundle not found" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_png_size_refused_with_estimate(label_bundle, tmp_path):
    proc = run_cli(
        "--model",
        str(label_bundle),
        "--prompt",
        "thing 1",
        "--num",
        "100000",
        "--scale",
        "64",
        "--out",
        str(tmp_path / "a.png"),
        check=False,
    )
    assert proc.returncode == 1
    assert "over the limit of 89 M pixels" in proc.stderr, proc.stderr


def test_cli_existing_output_needs_force(label_bundle, tmp_path):
    out = tmp_path / "a.png"
    out.write_bytes(b"precious")
    out.chmod(0o444)
    args = [
        "--model",
        str(label_bundle),
        "--prompt",
        "thing 1",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1 and "exists; pass --force to replace it" in proc.stderr
    assert out.read_bytes() == b"precious"
    run_cli(*args, "--force")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_invalid_utf8_prompt(label_bundle, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ddpm_rt.cli",
            "--model",
            os.fsencode(label_bundle),
            "--prompt",
            b"\xff\xfe thing",
            "--out",
            os.fsencode(tmp_path / "a.png"),
        ],
        capture_output=True,
    )
    assert proc.returncode == 1
    assert b"error: --prompt is not valid Unicode text" in proc.stderr


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--batch-sizes", "1,x"], "--batch-sizes must be comma-separated integers"),
        (["--batch-sizes", "0"], "--batch-sizes entry must be between 1"),
        (["--repeats", "0"], "--repeats must be between 1"),
        (["--json", "/nonexistent/b.json"], "output folder does not exist"),
    ],
    ids=["cli-bench-batch-sizes", "cli-bench-batch-zero", "cli-bench-repeats", "cli-bench-json"],
)
def test_cli_bench_flags_checked_first(tmp_path, extra, match):
    proc = run_cli("bench", str(tmp_path / "no-such-bundle"), *extra, check=False)
    assert proc.returncode == 1 and match in proc.stderr, proc.stderr


def test_cli_bench_json_needs_force(label_bundle, tmp_path):
    (tmp_path / "b.json").write_text("{}")
    proc = run_cli("bench", str(label_bundle), "--json", str(tmp_path / "b.json"), check=False)
    assert proc.returncode == 1 and "pass --force" in proc.stderr


# -- property-based: "a clear project error or a valid image, never anything else" -----
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3)
    ),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_mutated_manifests(data, tmp_path_factory):
    """Any field of a valid manifest replaced by any JSON value: valid, or one BundleError."""
    import json

    base = json.loads((Path(__file__).parent / "golden" / "manifest_2026-11-29.json").read_text())
    paths = list(_paths(base))
    path = data.draw(st.sampled_from(paths[1:]))
    value = data.draw(JSON)
    m = json.loads(json.dumps(base))
    obj = m
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value
    try:
        validate_manifest(m)
    except BundleError as e:
        assert "\n" not in str(e)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(prompt=st.text(max_size=40) | st.sampled_from(["thing 1", "thing 2:0.5 | thing 3:2"]))
def test_property_prompts(gen, text_gen, prompt):
    for g in (gen, text_gen):
        try:
            ctx = g.context(prompt)
        except InputError:
            continue
        assert ctx.shape == (g.bundle.context_dim,) and np.isfinite(ctx).all()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    num=st.one_of(st.integers(-2, 5), st.floats(), st.text(max_size=2), st.none()),
    steps=st.one_of(st.none(), st.integers(-1, 25), st.floats()),
    guidance=st.one_of(st.floats(), st.integers(-2, 60), st.none()),
    eta=st.one_of(st.none(), st.floats(), st.integers(-1, 2)),
    seed=st.one_of(st.integers(-1, 2**65), st.floats()),
    batch_size=st.one_of(st.integers(-1, 5), st.booleans()),
)
def test_property_api_arguments(gen, num, steps, guidance, eta, seed, batch_size):
    try:
        out = gen.generate(
            "thing 1",
            sampler="ddim",
            num=num,
            steps=steps,
            guidance=guidance,
            eta=eta,
            seed=seed,
            batch_size=batch_size,
        )
    except DdpmRtError as e:
        assert isinstance(e, InputError) and "\n" not in str(e)
        return
    assert out.dtype == np.uint8 and out.shape == (num, 8, 8, 3)


def test_generate_config_is_the_cli_contract():
    GenerateConfig().validate()
    with pytest.raises(InputError):
        GenerateConfig(num=-1).validate()


def test_bundle_loading_rejects_non_paths():
    with pytest.raises(InputError):
        Bundle.load(None)
