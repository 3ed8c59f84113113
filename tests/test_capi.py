"""The C ABI (libddpm_rt via cffi's embedding mode) and the C++17 example: built with the
system compiler as the README says, run as a program, and compared byte for byte with the
Python API; the error paths return codes and one-line messages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"

pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake"),
    pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C/C++ compiler"),
    pytest.mark.skipif(sys.platform != "linux", reason="the C ABI is built and tested on Linux"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    pytest.importorskip("cffi", reason="pip install 'ddpm-rt[capi]'")
    d = tmp_path_factory.mktemp("capi")
    capi, cpp = d / "capi", d / "cpp"
    run = {"check": True, "capture_output": True, "text": True}
    subprocess.run([sys.executable, "-m", "ddpm_rt.capi", "--out", str(capi)], **run)
    subprocess.run(
        ["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(cpp), f"-DDDPM_RT_CAPI={capi}"],
        **run,
    )
    subprocess.run(["cmake", "--build", str(cpp)], **run)
    errors = d / "errors"
    subprocess.run(
        [
            "cc",
            "-Wall",
            str(ROOT / "examples" / "cpp" / "errors.c"),
            "-I",
            str(capi),
            "-L",
            str(capi),
            "-lddpm_rt",
            f"-Wl,-rpath,{capi}",
            "-o",
            str(errors),
        ],
        **run,
    )
    return {"example": cpp / "ddpm_rt_example", "errors": errors, "dir": d}


def test_cpp_example_matches_the_python_api(built):
    from ddpm_rt import Generator

    out = built["dir"] / "apple.ppm"
    proc = subprocess.run(
        [str(built["example"]), str(DEFAULT), "red apple", "7", "3", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the library prints nothing to the host's stdout
    from ddpm_rt.bundle.bundle import Bundle

    n = Bundle.load(DEFAULT).recommended["steps"]  # the model's own settings, as the C call asked
    assert f"step {n}/{n}" in proc.stderr
    header, pixels = out.read_bytes().split(b"\n255\n", 1)
    _, h, w = Bundle.load(DEFAULT).image_shape  # the cascade's 64x64
    assert header == f"P6\n{w} {3 * h}".encode()
    want = Generator(DEFAULT).generate("red apple", num=3, seed=7)
    assert pixels == want.tobytes()
    # steps and guidance pass through
    proc = subprocess.run(
        [str(built["example"]), str(DEFAULT), "a frog", "2", "1", str(out), "6", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    want = Generator(DEFAULT).generate("a frog", num=1, seed=2, steps=6, guidance=2.0)
    assert out.read_bytes().split(b"\n255\n", 1)[1] == want.tobytes()


def test_cpp_example_matches_the_python_api_on_a_latent_bundle(built, latent_trained, tmp_path):
    """A latent bundle reports its pixels' shape (32x32, not the 8x8 latent) and the C++
    example's bytes are the Python API's, with its default decoder and with the fp16
    decoder chosen through options_json."""
    from ddpm_rt import Generator
    from ddpm_rt.export.quantize_decoder import decoder_variant

    b = tmp_path / "b"
    shutil.copytree(latent_trained["bundle"], b)
    decoder_variant(b, "fp16", log=lambda s: None)
    out = tmp_path / "a.ppm"
    for options in (None, '{"decoder_precision": "fp16"}'):
        args = [str(built["example"]), str(b), "red circle", "5", "2", str(out), "4", "2"]
        proc = subprocess.run(
            args + ([options] if options else []), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        header, pixels = out.read_bytes().split(b"\n255\n", 1)
        assert header == b"P6\n32 64"
        gen = Generator(b, decoder_precision="fp16" if options else None)
        want = gen.generate("red circle", num=2, seed=5, steps=4, guidance=2.0)
        assert pixels == want.tobytes(), options


def test_cpp_example_gives_a_cascade_base_picture_with_the_size_option(built, tmp_path):
    """A cascade bundle (issue 27): 32x32 by default, its 8x8 base picture with
    ``{"size": 8}`` (no decoder), each the Python API's bytes; a size it lacks is refused at
    open."""
    import numpy as np
    import torch
    from craft import write_bundle

    from ddpm_rt import Generator
    from ddpm_rt.export.cascade import build_cascade
    from ddpm_rt.training.shapes_dataset import make_shapes
    from ddpm_rt.training.upscaler_train import UpscalerTrainConfig, train_upscaler

    torch.set_num_threads(1)
    data = tmp_path / "d.npz"
    np.savez(data, **make_shapes(16, size=32, seed=1))
    up = tmp_path / "up"
    cfg = UpscalerTrainConfig(
        data=str(data),
        out=str(up),
        width=8,
        blocks=(1, 1, 1),
        steps=2,
        batch_size=4,
        holdout_style="",
        device="cpu",
    )
    train_upscaler(cfg, progress=False)
    c = build_cascade(write_bundle(tmp_path / "base"), up, tmp_path / "c", log=lambda s: None)
    out = tmp_path / "a.ppm"
    gen = Generator(c)
    for options, size in ((None, 32), ('{"size": 8}', 8)):
        args = [str(built["example"]), str(c), "thing 1", "5", "2", str(out), "4", "2"]
        proc = subprocess.run(
            args + ([options] if options else []), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        header, pixels = out.read_bytes().split(b"\n255\n", 1)
        assert header == f"P6\n{size} {2 * size}".encode()
        want = gen.generate("thing 1", num=2, seed=5, steps=4, guidance=2.0, size=size)
        assert pixels == want.tobytes(), options
    args = [str(built["example"]), str(c), "thing 1", "5", "2", str(out), "4", "2"]
    proc = subprocess.run([*args, '{"size": 12}'], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "size 12 is not one this model gives (choose from: 32, 8)" in proc.stderr


def test_c_abi_options_are_the_request_schemas_settings(built, tmp_path):
    """Issue 26: ddpm_rt_open's settings are GenerateConfig's (those ddpm_rt_generate does
    not take as arguments), checked by its schema before the model loads: a sampler and a
    spacing chosen in options_json give the Python API's bytes; a bad one is the schema's
    one-line error naming the field."""
    from ddpm_rt import Generator
    from ddpm_rt.capi._impl import SETTING_OPTIONS
    from ddpm_rt.config import SETTINGS

    calls = {"num", "seed", "steps", "guidance", "strength"}  # the functions' arguments
    assert set(SETTING_OPTIONS) == set(SETTINGS) - calls
    out = tmp_path / "a.ppm"
    args = [str(built["example"]), str(DEFAULT), "a frog", "3", "1", str(out), "5", "2"]
    options = '{"sampler": "dpm++2m", "spacing": "logsnr", "size": 16}'
    proc = subprocess.run([*args, options], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = Generator(DEFAULT).generate(
        "a frog", num=1, seed=3, steps=5, guidance=2.0, sampler="dpm++2m", spacing="logsnr",
        size=16,
    )  # fmt: skip
    assert out.read_bytes().split(b"\n255\n", 1)[1] == want.tobytes()
    proc = subprocess.run([*args, '{"eta": 2}'], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "eta must be a finite number between 0 and 1, got 2" in proc.stderr


def test_c_abi_error_paths(built):
    proc = subprocess.run(
        [str(built["errors"]), str(DEFAULT)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    got = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in proc.stdout.splitlines()}
    assert got["missing-bundle"].startswith("2 bundle not found")
    assert got["bad-options"].startswith("1 options_json is not valid JSON")
    assert got["unknown-option"].startswith("1 options_json may hold only")
    assert got["null-out"].startswith("1 ")
    assert got["open"].strip() == "0"
    assert got["num-zero"] == "1 num must be >= 1, got 0"
    from ddpm_rt.bundle.bundle import Bundle

    c, h, w = Bundle.load(DEFAULT).image_shape  # 2 images of the shipped model's size
    need = 2 * c * h * w
    assert got["too-small"] == f"6 {need} out_capacity 16 < {need} bytes needed"
    assert got["null-prompt"].startswith("1 ")
    assert got["bad-utf8"] == "1 prompt is not valid UTF-8"
    assert got["guidance-huge"].startswith("1 guidance must be a finite number")
    assert got["null-handle"] == "1 handle is NULL"
    assert got["version"] == __import__("ddpm_rt").__version__
    # ddpm_rt_generate_from_image's refusals: one line each, the existing codes
    assert got["img-null-rgb"] == "1 rgb must not be NULL"
    assert got["img-channels"] == "1 channels must be 3 (RGB) or 4 (RGBA), got 2"
    assert got["img-zero-width"] == "1 width and height must be >= 1, got 0x7"
    assert got["img-too-big"].startswith("1 the picture is 5000x5000 pixels, over the limit")
    assert got["img-strength"].startswith("1 strength must be a finite number between 0 and 1")
    assert got["img-too-small"] == f"6 {need} out_capacity 16 < {need} bytes needed"


def test_c_from_image_rgba_with_a_mask_matches_the_python_api(built):
    """Issue 28: ddpm_rt_generate_from_image from plain C -- a 10x7 RGBA picture (not the
    model's size, not square) and a mask, steps/guidance/strength given -- writes the bytes of
    Generator.generate(init_image=<the array>, mask=<the array>, ...)."""
    import numpy as np

    from ddpm_rt import Generator

    out = built["dir"] / "from_image.raw"
    proc = subprocess.run(
        [str(built["errors"]), str(DEFAULT), str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "from-image 0 \n" in proc.stdout
    y, x, k = np.mgrid[:7, :10, :4]
    picture = ((x * 37 + y * 11 + k * 53) % 256).astype(np.uint8)  # errors.c's pattern
    mask = np.where(x[..., 0] < 5, 255, 0).astype(np.uint8)
    want = Generator(DEFAULT).generate(
        "a frog", num=2, seed=3, steps=4, guidance=2.0, strength=0.6, init_image=picture,
        mask=mask,
    )  # fmt: skip
    assert out.read_bytes() == want.tobytes()


def _netpbm(path: Path, magic: bytes, pixels) -> Path:
    h, w = pixels.shape[:2]
    path.write_bytes(magic + f"\n{w} {h}\n255\n".encode() + pixels.tobytes())
    return path


def test_cpp_example_from_an_image_matches_the_python_api(built, tmp_path):
    """The C++ example's --init/--mask/--strength (ddpm_rt_generate_from_image): a 48x40
    PPM, with and without a PGM mask, the default strength (< 0 in C) and a given one."""
    import numpy as np

    from ddpm_rt import Generator

    rng = np.random.default_rng(5)
    picture = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 5:40] = 200
    ppm = _netpbm(tmp_path / "in.ppm", b"P6", picture)
    pgm = _netpbm(tmp_path / "m.pgm", b"P5", mask)
    gen = Generator(DEFAULT)
    out = tmp_path / "a.ppm"
    cases = [
        ([], {}),
        (["--strength", "0.5", "--mask", str(pgm)], {"strength": 0.5, "mask": mask}),
    ]
    for flags, kw in cases:
        args = ["--init", str(ppm), *flags, str(DEFAULT), "a red car", "4", "2", str(out)]
        proc = subprocess.run(
            [str(built["example"]), *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        want = gen.generate("a red car", num=2, seed=4, init_image=picture, **kw)
        assert out.read_bytes().split(b"\n255\n", 1)[1] == want.tobytes(), flags


def test_cpp_example_cancels_on_sigint(built, tmp_path):
    """The host's SIGINT handler makes the progress callback return 0: DDPM_RT_CANCELLED."""
    import signal
    import time

    out = tmp_path / "a.ppm"
    proc = subprocess.Popen(
        [str(built["example"]), str(DEFAULT), "red apple", "1", "64", str(out), "500"],
        stderr=subprocess.PIPE,
        text=True,
    )
    err = ""
    while "step" not in err and proc.poll() is None:  # sampling has started
        err += proc.stderr.read(1)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err += proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 5, err  # DDPM_RT_CANCELLED
    assert "cancelled by the callback" in err
    assert not out.exists()


def test_header_matches_the_library_contract():
    text = (ROOT / "runtime" / "capi" / "ddpm_rt.h").read_text()
    for name in (
        "ddpm_rt_open",
        "ddpm_rt_generate",
        "ddpm_rt_last_error",
        "ddpm_rt_close",
        "ddpm_rt_version",
        "ddpm_rt_image_shape",
        "ddpm_rt_generate_from_image",
    ):
        assert name + "(" in text
    # the pixel buffer's C type, as a C parser reads the header (pycparser, what cffi uses):
    # one byte per channel value -- what test_cpp_example_matches_the_python_api compares
    # with the Python API's uint8 images byte for byte
    pycparser = pytest.importorskip("pycparser")
    from pycparser import c_ast, c_generator

    from ddpm_rt.capi import _declarations

    std = "typedef unsigned char uint8_t; typedef unsigned long size_t, uint64_t;\n"
    ast = pycparser.c_parser.CParser().parse(std + _declarations())
    params = {
        d.name: [c_generator.CGenerator().visit(p) for p in d.type.args.params]
        for d in ast.ext
        if isinstance(d, c_ast.Decl) and isinstance(d.type, c_ast.FuncDecl)
    }
    assert params["ddpm_rt_generate"][-3:] == [
        "uint8_t *out_rgb",
        "size_t out_capacity",
        "size_t *written",
    ]
    assert params["ddpm_rt_image_shape"][1:] == ["int *height", "int *width", "int *channels"]
    # image-to-image: ddpm_rt_generate's arguments, with strength and the picture inserted
    img = params["ddpm_rt_generate_from_image"]
    assert img[:6] + img[12:] == params["ddpm_rt_generate"]
    assert img[6:12] == [
        "double strength",
        "const uint8_t *rgb",
        "int width",
        "int height",
        "int channels",
        "const uint8_t *mask",
    ]
