from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ddpm-rt`` as a user would: a separate process, text output captured."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_rt.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ddpm-rt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def shapes_npz(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shapes.npz"
    run_cli("data", "shapes", "--out", str(out), "--num", "256", "--seed", "3")
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, shapes_npz) -> dict:
    """~50 steps of real training through the CLI, then export: a small but real bundle."""
    d = tmp_path_factory.mktemp("trained")
    ckpt, bundle = d / "ckpt", d / "bundle"
    run_cli(
        "train",
        "--data",
        str(shapes_npz),
        "--out",
        str(ckpt),
        "--steps",
        "50",
        "--batch-size",
        "32",
        "--n-feat",
        "32",
        "--sample-every",
        "0",
        "--no-progress",
    )
    exp = run_cli("export", str(ckpt), "--out", str(bundle))
    return {"ckpt": ckpt, "bundle": bundle, "export_log": exp.stderr}


def make_tiny_text_encoder(out: Path, default_precision: str = "int8") -> Path:
    """A tiny random-weight BERT + a word-level WordPiece tokenizer built with `tokenizers`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from ddpm_rt.export.text_encoder import BertConfig, SentenceEncoder
    from ddpm_rt.export.text_export import export_text_encoder

    words = (
        "a an the small large big red green blue yellow circle square triangle ball dog "
        "cat happy sad face apple boy man , . !"
    ).split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "src_tokenizer.json"))
    torch.manual_seed(0)
    model = SentenceEncoder(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    ).eval()
    torch.save(model.state_dict(), out / "weights.pt")
    export_text_encoder(
        out,
        model=model,
        tokenizer_path=out / "src_tokenizer.json",
        max_tokens=12,
        default_precision=default_precision,
        source="tiny test BERT",
        log=lambda s: None,
    )
    return out


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    return make_tiny_text_encoder(tmp_path_factory.mktemp("tiny_text"))


@pytest.fixture(scope="session")
def text_trained(tmp_path_factory, shapes_npz, tiny_text) -> dict:
    """A caption-conditioned model trained briefly on the shapes' captions, exported."""
    d = tmp_path_factory.mktemp("text_trained")
    ckpt, bundle = d / "ckpt", d / "bundle"
    run_cli(
        "train",
        "--data",
        str(shapes_npz),
        "--text-encoder",
        str(tiny_text),
        "--out",
        str(ckpt),
        "--steps",
        "30",
        "--batch-size",
        "32",
        "--n-feat",
        "16",
        "--sample-every",
        "0",
        "--no-progress",
    )
    run_cli("export", str(ckpt), "--out", str(bundle))
    return {"ckpt": ckpt, "bundle": bundle}


@pytest.fixture(scope="session")
def latent_trained(tmp_path_factory, tiny_text) -> dict:
    """A tiny *latent* bundle (issue 19): 32x32 captioned shapes, an autoencoder (width 8,
    4 steps) to 8x8x4 latents, a caption-conditioned U-Net (n_feat 8, 3 steps) on them, and
    the export with its decoder graph. Real, but nowhere near trained: for contracts only."""
    import numpy as np

    from ddpm_rt.training.shapes_dataset import make_shapes

    d = tmp_path_factory.mktemp("latent_trained")
    data = make_shapes(48, size=32, seed=5)
    data["styles"] = np.array(["a", "b", "c"] * 16)
    np.savez(d / "shapes32.npz", **data)
    ae, lat, ckpt, bundle = d / "ae", d / "lat.npz", d / "ckpt", d / "bundle"
    run_cli(
        "train-autoencoder", "--data", str(d / "shapes32.npz"), "--out", str(ae),
        "--latent-channels", "4", "--encoder-width", "8", "--decoder-width", "8",
        "--steps", "4", "--batch-size", "8", "--holdout-style", "c", "--no-progress",
    )  # fmt: skip
    run_cli("encode-latents", str(ae), "--data", str(d / "shapes32.npz"), "--out", str(lat))
    run_cli(
        "train", "--data", str(lat), "--text-encoder", str(tiny_text), "--out", str(ckpt),
        "--steps", "3", "--batch-size", "8", "--n-feat", "8", "--sample-every", "0",
        "--no-progress",
    )  # fmt: skip
    exp = run_cli("export", str(ckpt), "--out", str(bundle))
    return {"ae": ae, "latents": lat, "ckpt": ckpt, "bundle": bundle, "export_log": exp.stderr}


class CountingBackend:
    """Delegates to a real backend and counts runs per graph (the encoder's cache tests)."""

    def __init__(self, inner):
        self.inner = inner
        self.runs: dict[str, int] = {}

    def run(self, graph, feeds):
        self.runs[graph] = self.runs.get(graph, 0) + 1
        return self.inner.run(graph, feeds)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(autouse=True, scope="session")
def _private_ort_cache(tmp_path_factory):
    """Tests (and the CLI processes they start) use their own optimised-graph cache."""
    os.environ["DDPM_RT_CACHE"] = str(tmp_path_factory.mktemp("ort_cache"))
