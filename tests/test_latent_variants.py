"""A latent bundle's precision variants (issue 19): fp16 and int8 decoders, each checked
against the fp32 decoder on recorded latents and refused (bundle unchanged) when it misses;
the U-Net's int8 variant of a latent bundle (calibrated on latents)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ddpm_rt import Bundle, Generator

from conftest import run_cli

KW = {"num": 2, "sampler": "ddim", "steps": 4, "eta": 0.0, "seed": 3}


def _copy(latent_trained, tmp_path) -> Path:
    b = tmp_path / "b"
    shutil.copytree(latent_trained["bundle"], b)
    return b


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_decoder_variants_via_the_cli(latent_trained, tmp_path):
    b = _copy(latent_trained, tmp_path)
    for precision in ("fp16", "int8"):
        proc = run_cli("quantize", str(b), "--graph", "decoder", "--precision", precision)
        assert f"{precision} vs fp32 decoder on" in proc.stderr
    bundle = Bundle.load(b, hash_all=True)
    assert bundle.decoder_precisions == {
        "fp32": "decoder",
        "fp16": "decoder_fp16",
        "int8": "decoder_int8",
    }
    assert bundle.graphs["decoder_fp16"].file == "decoder.fp16.onnx"
    assert bundle.graphs["decoder_int8"].file == "decoder.int8.onnx"
    variants = bundle.latent["decoder"]["variants"]
    assert variants["fp16"]["checks"]["max_grey_levels"] <= 1.0
    assert variants["int8"]["checks"]["mean_grey_levels"] <= 1.0
    assert "unet_precisions" not in bundle.manifest  # the U-Net's variants are untouched
    ref = Generator(b).generate("red circle", **KW).astype(int)
    for precision in ("fp16", "int8"):
        gen = Generator(b, decoder_precision=precision)
        assert gen.decoder_graph == f"decoder_{precision}"
        got = gen.generate("red circle", **KW).astype(int)
        assert got.shape == (2, 32, 32, 3)
        assert np.abs(got - ref).max() <= (1 if precision == "fp16" else 8)
    # again without --force: nothing to do, nothing rewritten
    before = _snapshot(b)
    proc = run_cli("quantize", str(b), "--graph", "decoder", "--precision", "fp16")
    assert "already has an fp16 decoder" in proc.stderr and _snapshot(b) == before


def test_decoder_variant_that_misses_writes_nothing(latent_trained, tmp_path, monkeypatch):
    """A decoder held to a bound it cannot meet (here: a tolerance no int8 graph meets) is
    refused with its figures, and the bundle is byte for byte as it was; a forced redo of an
    existing variant that misses leaves the bundle loadable too."""
    from ddpm_rt import tolerances
    from ddpm_rt.export.quantize import QuantizeError
    from ddpm_rt.export.quantize_decoder import decoder_variant

    b = _copy(latent_trained, tmp_path)
    decoder_variant(b, "fp16", log=lambda s: None)
    before = _snapshot(b)
    monkeypatch.setitem(
        tolerances.TOLERANCES,
        ("ort", "decoder-int8"),
        {"max_grey_levels": 1e-6, "mean_grey_levels": 1e-6},
    )
    with pytest.raises(QuantizeError, match=r"int8 decoder misses its parity check.*unchanged"):
        decoder_variant(b, "int8", log=lambda s: None)
    assert _snapshot(b) == before
    monkeypatch.setitem(
        tolerances.TOLERANCES,
        ("ort", "decoder-fp16"),
        {"max_grey_levels": 1e-6, "mean_grey_levels": 1e-6},
    )
    with pytest.raises(QuantizeError, match="fp16 decoder misses"):
        decoder_variant(b, "fp16", force=True, log=lambda s: None)
    assert Bundle.load(b, hash_all=True).decoder_precisions["fp32"] == "decoder"


def test_decoder_variant_bad_requests_are_one_line(latent_trained, trained, tmp_path):
    b = _copy(latent_trained, tmp_path)
    before = _snapshot(b)
    cases = [
        ((str(b), "--graph", "decoder", "--precision", "int8-qdq"), "takes --precision fp16"),
        ((str(trained["bundle"]), "--graph", "decoder", "--precision", "fp16"), "pixel bundle"),
    ]
    for args, want in cases:
        proc = run_cli("quantize", *args, check=False)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("error: ") and want in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _snapshot(b) == before


def test_unet_variants_of_a_latent_bundle(latent_trained, tmp_path):
    """The U-Net of a latent bundle samples latents: its variants are made and checked on
    (B, 4, 8, 8) inputs. fp16 passes; the int8 graph is calibrated and judged too, but this
    3-step U-Net is too untrained for the int8 cosine bound (a parity refusal, not a shape
    error), and the refusal leaves the bundle as it was."""
    from ddpm_rt.export.quantize import FP16_GRAPH, QuantizeError, fp16_bundle, quantize_bundle

    b = _copy(latent_trained, tmp_path)
    entry = fp16_bundle(b, log=lambda s: None)
    assert entry["checks"]["max_rel_l2"] < 1e-2
    bundle = Bundle.load(b, hash_all=True)
    assert bundle.unet_precisions == {"fp32": "unet", "fp16": FP16_GRAPH}
    assert bundle.graphs[FP16_GRAPH].inputs[0].shape[1:] == (4, 8, 8)
    assert bundle.decoder_precisions == {"fp32": "decoder"}
    gen = Generator(b, unet_precision="fp16")
    assert gen.generate("red circle", **KW).shape == (2, 32, 32, 3)
    before = _snapshot(b)
    with pytest.raises(QuantizeError, match="int8 U-Net misses its parity check"):
        quantize_bundle(b, log=lambda s: None)
    assert _snapshot(b) == before
