"""Training: data formats, determinism, resume."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpm_rt.errors import InputError
from ddpm_rt.training.data import load_dataset
from ddpm_rt.training.shapes_dataset import LABEL_NAMES, make_shapes
from ddpm_rt.training.train import TrainConfig, Trainer, train


def test_course_format_loads_as_is(tmp_path):
    """The course's sprites: (N,16,16,3) uint8 .npy + one-hot (N,5) float .npy."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    onehot = np.eye(5)[rng.integers(0, 5, 20)]  # float64, as the course ships it
    np.save(tmp_path / "sprites.npy", images)
    np.save(tmp_path / "labels.npy", onehot)
    names = ["hero", "non-hero", "food", "spell", "side-facing"]
    ds = load_dataset(tmp_path / "sprites.npy", labels=tmp_path / "labels.npy", label_names=names)
    assert ds.images.shape == (20, 16, 16, 3) and ds.contexts.dtype == np.float32
    np.testing.assert_array_equal(ds.contexts, onehot)
    assert ds.conditioning == {"kind": "label", "context_dim": 5, "label_names": names}


def test_shapes_npz_and_contexts(tmp_path):
    arrays = make_shapes(30, seed=1)
    assert arrays["images"].shape == (30, 16, 16, 3)
    assert np.array_equal(arrays["images"], make_shapes(30, seed=1)["images"])  # deterministic
    np.savez(tmp_path / "s.npz", **arrays)
    ds = load_dataset(tmp_path / "s.npz")
    assert ds.label_names == LABEL_NAMES and ds.context_dim == 12
    np.testing.assert_array_equal(ds.contexts.argmax(1), arrays["labels"])
    np.save(tmp_path / "ctx.npy", np.random.default_rng(0).standard_normal((30, 7)))
    ds = load_dataset(tmp_path / "s.npz", contexts=tmp_path / "ctx.npy")
    assert ds.conditioning == {"kind": "vector", "context_dim": 7}


@pytest.mark.parametrize(
    "images,labels,match",
    [
        (np.zeros((4, 15, 15, 3), np.uint8), np.zeros(4, np.int64), "divisible by 4"),
        (np.zeros((4, 16, 16, 3), np.float32), np.zeros(4, np.int64), "uint8"),
        (np.zeros((4, 16, 16, 3), np.uint8), np.zeros(5, np.int64), "5 labels for 4 images"),
    ],
)
def test_bad_data_is_rejected(tmp_path, images, labels, match):
    np.savez(tmp_path / "bad.npz", images=images, labels=labels)
    with pytest.raises(InputError, match=match):
        load_dataset(tmp_path / "bad.npz")


def _cfg(data, out, steps):
    return TrainConfig(
        data=str(data),
        out=str(out),
        steps=steps,
        batch_size=8,
        n_feat=8,
        sample_every=0,
        checkpoint_every=1000,
        timesteps=50,
    )


def test_resume_continues_exactly(tmp_path):
    np.savez(tmp_path / "d.npz", **make_shapes(40, seed=2))
    torch.set_num_threads(1)  # bitwise-equal float sums
    train(_cfg(tmp_path / "d.npz", tmp_path / "straight", 6), progress=False)
    # An interrupted run: 3 of 6 steps, then a checkpoint (as --checkpoint-every writes).
    interrupted = Trainer(
        _cfg(tmp_path / "d.npz", tmp_path / "resumed", 6), load_dataset(tmp_path / "d.npz")
    )
    for _ in range(3):
        interrupted.train_step()
    interrupted.save()
    summary = train(
        _cfg(tmp_path / "d.npz", tmp_path / "resumed", None), resume=True, progress=False
    )
    assert summary["steps"] == 6
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}:{k}")
    meta = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert meta["step"] == 6 and meta["conditioning"]["label_names"] == LABEL_NAMES
    assert (tmp_path / "resumed" / "samples" / "step_0000006.png").exists()


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    np.savez(tmp_path / "d.npz", **make_shapes(16, seed=2))
    train(_cfg(tmp_path / "d.npz", tmp_path / "ck", 1), progress=False)
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    with pytest.raises(InputError, match="--resume"):
        train(_cfg(tmp_path / "d.npz", tmp_path / "ck", 2), progress=False)
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    with pytest.raises(InputError, match="nothing to resume"):
        train(_cfg(tmp_path / "d.npz", tmp_path / "none", 2), resume=True, progress=False)


def test_training_reduces_the_loss(tmp_path):
    np.savez(tmp_path / "d.npz", **make_shapes(128, seed=4))
    cfg = TrainConfig(
        data=str(tmp_path / "d.npz"),
        out=str(tmp_path / "ck"),
        steps=60,
        batch_size=32,
        n_feat=16,
        sample_every=0,
        lr=2e-3,
    )
    train(cfg, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ck" / "metrics.jsonl").open()]
    assert losses[-1] < 0.6 * losses[0], losses
