"""The text path: tokenizer + exported encoder, checks, caching, blending, data adapters."""

import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from ddpm_rt.errors import BundleError, InputError
from ddpm_rt.export.text_encoder import BertConfig, SentenceEncoder
from ddpm_rt.text import load_tokenizer, open_text_folder, parse_blend, read_text_folder, tokenize
from ddpm_rt.training.data import load_dataset
from ddpm_rt.training.shapes_dataset import make_shapes

from conftest import CountingBackend

PROMPTS = ["a red circle", "a big happy dog", "the sad boy !", "a blue square", "man"]


def _torch_model(folder):
    meta = json.loads((folder / "text.json").read_text())
    m = SentenceEncoder(BertConfig.from_dict(meta["model"])).eval()
    m.load_state_dict(torch.load(folder / "weights.pt"))
    return m


def test_tokenize_and_truncate(tiny_text):
    tok = load_tokenizer(tiny_text / "tokenizer.json")
    ids, mask, trunc = tokenize(tok, "a red circle", 12)
    assert ids.tolist() == [[2, *ids[0, 1:-1].tolist(), 3]] and ids.shape == (1, 5)
    assert mask.tolist() == [[1] * 5] and not trunc
    ids, _, trunc = tokenize(tok, " ".join(["red"] * 30), 12)
    assert trunc and ids.shape == (1, 12) and ids[0, 0] == 2 and ids[0, -1] == 3


def test_export_parity_holds_when_recomputed(tiny_text):
    """The exporter records parity figures about itself (text.json "checks"); asserting them
    would only test its bookkeeping. Recomputed here instead, sharing no code with it: the
    fp32 ONNX file run by ONNX Runtime directly, one prompt per run and in one padded batch,
    against the torch model with the saved weights."""
    from ddpm_rt.export.text_export import FP32_FILE

    recorded = read_text_folder(tiny_text)["checks"]
    assert recorded["captions"] >= 300  # how many captions the export compared
    model, tok = _torch_model(tiny_text), load_tokenizer(tiny_text / "tokenizer.json")
    sess = ort.InferenceSession(str(tiny_text / FP32_FILE), providers=["CPUExecutionProvider"])
    texts = [*PROMPTS, " ".join(["red"] * 30)]  # the last one truncated to 12 tokens
    rows = [tokenize(tok, p, 12)[:2] for p in texts]
    with torch.no_grad():
        ref = np.concatenate([model(*(torch.from_numpy(a) for a in r)).numpy() for r in rows])
    alone = np.concatenate(
        [sess.run(None, {"input_ids": i, "attention_mask": m})[0] for i, m in rows]
    )
    width = max(i.shape[1] for i, _ in rows)
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for k, (i, _) in enumerate(rows):
        ids[k, : i.shape[1]], mask[k, : i.shape[1]] = i[0], 1
    batch = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    for got in (alone, batch):
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() >= 0.9999, cos


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_runtime_encoder_matches_torch_and_ignores_batch_mates(tiny_text, precision):
    enc = open_text_folder(tiny_text, precision=precision)
    together = enc.encode(PROMPTS)
    for p, row in zip(PROMPTS, together, strict=True):
        fresh = open_text_folder(tiny_text, precision=precision)
        np.testing.assert_array_equal(fresh.encode([p])[0], row)  # bit-identical alone
    model = _torch_model(tiny_text)
    tok = load_tokenizer(tiny_text / "tokenizer.json")
    with torch.no_grad():
        ref = np.concatenate(
            [
                model(*(torch.from_numpy(a) for a in tokenize(tok, p, 12)[:2])).numpy()
                for p in PROMPTS
            ]
        )
    cos = (together * ref).sum(1)
    assert cos.min() >= (0.9999 if precision == "fp32" else 0.95), cos
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)


def test_cache_empty_prompt_and_truncation_warning(tiny_text):
    enc = open_text_folder(tiny_text)
    enc.backend = counting = CountingBackend(enc.backend)
    enc.encode(["a red circle", "a red circle", "a  red   circle", "a dog"])
    assert sum(counting.runs.values()) == 2
    assert not enc.embed("").any() and sum(counting.runs.values()) == 2
    with pytest.warns(UserWarning, match="truncated to 12 tokens"):
        enc.embed(" ".join(["red"] * 30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.embed(" ".join(["red"] * 30))  # cached: no second warning, no second run


def test_blending(tiny_text):
    assert parse_blend("a dog:0.7 | a cat:0.3") == [("a dog", 0.7), ("a cat", 0.3)]
    assert parse_blend("ratio 1:2") == [("ratio 1:2", 1.0)]
    assert parse_blend("a dog | a cat") == [("a dog", 1.0), ("a cat", 1.0)]
    for bad in ("a dog:0.5 | ", "a:-1 | b", "a:0 | b:0"):
        with pytest.raises(InputError):
            parse_blend(bad)
    enc = open_text_folder(tiny_text)
    mix = enc.context("a dog:0.7 | a cat:0.3")
    want = 0.7 * enc.embed("a dog") + 0.3 * enc.embed("a cat")
    np.testing.assert_allclose(mix, want / np.linalg.norm(want), rtol=1e-5)


def test_tampered_text_folder_is_rejected(tiny_text, tmp_path):
    import shutil

    dst = tmp_path / "t"
    shutil.copytree(tiny_text, dst)
    (dst / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match="sha256"):
        open_text_folder(dst)


def test_imagefolder_with_several_captions(tiny_text, tmp_path):
    arrays = make_shapes(6, seed=5)
    lines = []
    for i, img in enumerate(arrays["images"]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        lines.append({"file_name": f"{i}.png", "text": str(arrays["captions"][i])})
    lines.append({"file_name": "0.png", "text": ["a ball", "a red ball"]})  # more captions
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    ds = load_dataset(tmp_path, text_encoder=tiny_text, cache=tmp_path / "cache.npz")
    assert ds.images.shape == (6, 16, 16, 3) and ds.context_dim == 32
    assert ds.num_choices.tolist() == [3, 1, 1, 1, 1, 1]
    assert ds.conditioning["kind"] == "text" and len(ds.captions) == len(set(ds.captions))
    enc = open_text_folder(tiny_text, precision="fp32")
    row = ds.table[ds.captions.index("a red ball")]
    np.testing.assert_allclose(row, enc.embed("a red ball"), rtol=1e-6)
    again = load_dataset(tmp_path, text_encoder=tiny_text, cache=tmp_path / "cache.npz")
    np.testing.assert_array_equal(again.table, ds.table)
    with pytest.raises(InputError, match="--text-encoder"):
        load_dataset(tmp_path)


def test_label_names_become_captions(tiny_text, tmp_path):
    arrays = make_shapes(10, seed=6)
    np.savez(
        tmp_path / "d.npz",
        images=arrays["images"],
        labels=arrays["labels"],
        label_names=arrays["label_names"],
    )
    ds = load_dataset(tmp_path / "d.npz", text_encoder=tiny_text)
    first = ds.captions[ds.choices[0, 0]]
    assert first == str(arrays["label_names"][arrays["labels"][0]])


def test_onnx_graph_has_dynamic_batch_and_sequence(tiny_text):
    sess = ort.InferenceSession(
        str(tiny_text / "text_encoder.onnx"), providers=["CPUExecutionProvider"]
    )
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    ids = np.array([[2, 5, 6, 3, 0, 0]], dtype=np.int64)
    out = sess.run(None, {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)})[0]
    short = sess.run(None, {"input_ids": ids[:, :4], "attention_mask": np.ones((1, 4), np.int64)})[
        0
    ]
    np.testing.assert_allclose(out, short, atol=1e-6)  # padding changes nothing
