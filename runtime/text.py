"""Text -> context: ``tokenizers`` + the exported sentence encoder. No transformers, no torch.

A prompt is encoded alone (one encoder run per prompt, no padding): its embedding then does
not depend on what else is encoded with it, also with the int8 encoder, whose dynamic
activation scales would otherwise be shared across a batch. Embeddings are cached per
prompt, so repeated prompts never re-run the encoder. The empty prompt is the null (zero)
context. Prompts longer than the token limit are truncated, with a warning.

Prompt blending: ``"a dog:0.7 | a cat:0.3"`` is the weighted mean of the parts' embeddings
(weights normalised to sum 1), re-normalised to unit length like every other context.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings

import numpy as np
from tokenizers import Tokenizer

from ddpm_rt.errors import BundleError, InputError, NumericalError, first_line
from ddpm_rt.tolerances import EMBEDDING_NORM_ATOL

_WEIGHT = re.compile(r"^(.*?):\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*$", re.S)


def load_tokenizer(source, name: str = "tokenizer.json") -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` path or from its (verified) bytes."""
    try:
        if isinstance(source, bytes):
            tok = Tokenizer.from_str(source.decode("utf-8"))
        else:
            name = str(source)
            tok = Tokenizer.from_file(name)
    except Exception as e:
        raise BundleError(f"cannot read tokenizer {name}: {first_line(e)}") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def tokenize(tok: Tokenizer, text: str, max_tokens: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(input_ids (1,S) int64, attention_mask (1,S) int64, truncated?) for one prompt."""
    enc = tok.encode(text)
    ids = enc.ids
    truncated = len(ids) > max_tokens
    if truncated:  # keep [CLS] ... and the final [SEP]
        ids = [*ids[: max_tokens - 1], ids[-1]]
    ids_arr = np.asarray([ids], dtype=np.int64)
    return ids_arr, np.ones_like(ids_arr), truncated


MAX_PROMPT_CHARS = 10_000  # far beyond any token limit; bounds tokenizer time and memory
MAX_BLEND_WEIGHT = 1e6  # weights are normalised, so only their ratios matter


def _short(prompt: str) -> str:
    return repr(prompt if len(prompt) <= 60 else prompt[:57] + "...")


def check_prompt(prompt, what: str = "prompt") -> str:
    """A prompt must be a ``str`` of valid Unicode text (no lone surrogates), not too long."""
    if not isinstance(prompt, str):
        raise InputError(f"{what} must be a string, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{what} is not valid Unicode text (invalid UTF-8 or a lone surrogate)"
        ) from None
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(
            f"{what} has {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}"
        )
    return prompt


def parse_blend(prompt: str) -> list[tuple[str, float]]:
    """``"a dog:0.7 | a cat:0.3"`` -> [("a dog", 0.7), ("a cat", 0.3)]; no ``|`` -> one part."""
    if "|" not in prompt:
        return [(prompt.strip(), 1.0)]
    parts = []
    for raw in prompt.split("|"):
        m = _WEIGHT.match(raw.strip())
        text, weight = (m.group(1).strip(), float(m.group(2))) if m else (raw.strip(), 1.0)
        if not text:
            raise InputError(f"empty part in blended prompt {_short(prompt)}")
        if not 0 <= weight <= MAX_BLEND_WEIGHT:
            raise InputError(
                f"blend weight {m.group(2) if m else weight!s:.20} in {_short(prompt)} must be "
                f"between 0 and {MAX_BLEND_WEIGHT:g}"
            )
        parts.append((text, weight))
    if sum(w for _, w in parts) <= 0:
        raise InputError(f"blended prompt {_short(prompt)} has no positive weight")
    return parts


class TextEncoder:
    """Prompt -> unit-length embedding (D,), through a backend's text-encoder graph."""

    def __init__(self, backend, tokenizer, graph: str, max_tokens: int, dim: int):
        """``tokenizer``: a ``tokenizer.json`` path or its verified bytes."""
        self.backend = backend
        self.tokenizer = load_tokenizer(tokenizer)
        self.graph = graph
        self.max_tokens = max_tokens
        self.dim = dim
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # one encoder may serve several threads

    def embed(self, text: str) -> np.ndarray:
        """Unit-length embedding (D,) of one prompt; the empty prompt is zeros. Cached."""
        key = " ".join(check_prompt(text).split())
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if not key:
            emb = np.zeros(self.dim, dtype=np.float32)
        else:
            ids, mask, truncated = tokenize(self.tokenizer, key, self.max_tokens)
            if truncated:
                warnings.warn(
                    f"prompt truncated to {self.max_tokens} tokens: {key[:40]!r}…", stacklevel=2
                )
            out = self.backend.run(self.graph, {"input_ids": ids, "attention_mask": mask})
            emb = out["embedding"][0].astype(np.float32)
            norm = float(np.linalg.norm(emb.astype(np.float64)))
            if not abs(norm - 1.0) <= EMBEDDING_NORM_ATOL:  # also catches NaN and Inf
                raise NumericalError(
                    f"text encoder {self.graph!r} returned an embedding of norm {norm:.4g} for "
                    f"{_short(key)}; a sentence embedding must have unit length "
                    "(a broken or wrongly quantised graph)"
                )
        emb.setflags(write=False)  # cached and shared: callers get copies
        with self._lock:
            self._cache[key] = emb
        return emb

    def clear_cache(self) -> None:
        """Forget every cached embedding: the next prompt runs the encoder again
        (``ddpm-rt bench`` times prompt -> images with the encoder in each call)."""
        with self._lock:
            self._cache.clear()

    def context(self, prompt: str) -> np.ndarray:
        """Embedding of a prompt, blended prompts included."""
        parts = parse_blend(check_prompt(prompt))
        if len(parts) == 1:
            return self.embed(parts[0][0])
        total = sum(w for _, w in parts)
        mix = sum((w / total) * self.embed(t) for t, w in parts)
        norm = float(np.linalg.norm(mix))
        return (mix / norm if norm > 0 else mix).astype(np.float32)

    def encode(self, prompts: list[str]) -> np.ndarray:
        """(N, D) embeddings, one encoder run per distinct uncached prompt."""
        return (
            np.stack([self.context(p) for p in prompts])
            if prompts
            else np.zeros((0, self.dim), np.float32)
        )


TEXT_MANIFEST = "text.json"
TEXT_FORMAT = "ddpm-rt-text-encoder"
PRECISIONS = ("fp32", "int8")


def read_text_folder(path, verify_hashes: bool = True) -> dict:
    """Validate a text-encoder folder written by ``ddpm-rt text export``; returns text.json."""
    import json
    from pathlib import Path

    from ddpm_rt.bundle.fileio import sha256_file

    path = Path(path)
    mpath = path / TEXT_MANIFEST
    if not mpath.is_file():
        raise BundleError(f"not a text-encoder folder (no {TEXT_MANIFEST}): {path}")
    try:  # explicit checks, not asserts: validation must survive ``python -O``
        meta = json.loads(mpath.read_text())
        int(meta["max_tokens"]), int(meta["embedding_dim"]), meta["graphs"]["fp32"]["file"]
        valid = meta["format"] == TEXT_FORMAT
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise BundleError(f"invalid {mpath}")
    if verify_hashes:
        for name, f in meta["files"].items():
            p = path / name
            if not p.is_file() or sha256_file(p) != f["sha256"]:
                raise BundleError(f"text encoder file {p} is missing or does not match its sha256")
    return meta


def open_text_folder(
    path, precision: str | None = None, providers: list[str] | None = None
) -> TextEncoder:
    """A :class:`TextEncoder` over a text-encoder folder (used by training and tools)."""
    from pathlib import Path

    from ddpm_rt.backends.ort import OrtBackend

    path = Path(path)
    meta = read_text_folder(path)
    precision = precision or meta["default_precision"]
    if precision not in meta["graphs"]:
        raise InputError(f"text encoder precision must be one of {', '.join(meta['graphs'])}")
    from ddpm_rt.bundle.io_spec import text_encoder_io

    files = {k: path / g["file"] for k, g in meta["graphs"].items()}
    backend = OrtBackend(
        {k: (lambda f=f: contextlib.nullcontext(str(f))) for k, f in files.items()},
        specs={k: text_encoder_io(int(meta["embedding_dim"])) for k in files},
        providers=providers,
    )
    return TextEncoder(
        backend,
        path / meta["tokenizer"],
        precision,
        int(meta["max_tokens"]),
        int(meta["embedding_dim"]),
    )
