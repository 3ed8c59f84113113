"""The residual blocks' int8-friendlier variants (issue 19): BatchNorm + ReLU and scaled
weight standardisation + ReLU. Both must export to a graph whose blocks are plain Conv
(+ Relu) -- nothing between a convolution and its activation for the int8 graph to
dequantise -- and the exported graph must compute what the torch model computes."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from ddpm_rt.errors import InputError
from ddpm_rt.training.data import load_dataset
from ddpm_rt.training.model import ContextUnet, UNetConfig, WSConv2d, fold_for_export
from ddpm_rt.training.shapes_dataset import make_shapes
from ddpm_rt.training.train import TrainConfig, Trainer

from conftest import run_cli


def _args(b=3, d=4):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, 3, 16, 16, generator=g),
        torch.rand(b, 1, generator=g),
        torch.randn(b, d, generator=g),
    )


def test_bad_block_names_are_refused():
    with pytest.raises(InputError, match="norm must be one of group, batch, ws"):
        UNetConfig(norm="layer")
    with pytest.raises(InputError, match="activation must be one of gelu, relu"):
        UNetConfig(activation="silu")


def test_ws_standardises_each_output_channel():
    conv = WSConv2d(5, 7)
    w = conv.standardized_weight().detach()
    fan_in = 5 * 9
    np.testing.assert_allclose(w.mean(dim=(1, 2, 3)).numpy(), 0, atol=1e-6)
    np.testing.assert_allclose(
        (w.var(dim=(1, 2, 3), unbiased=False) * fan_in).numpy(), 1, rtol=1e-3
    )


def test_ws_fold_keeps_the_outputs():
    torch.manual_seed(1)
    m = ContextUnet(UNetConfig(n_feat=16, context_dim=4, norm="ws", activation="relu")).eval()
    with torch.no_grad():  # trained-looking gains and biases, not the init's ones and zeros
        for mod in m.modules():
            if isinstance(mod, WSConv2d):
                mod.gain.uniform_(0.5, 2.0)
                mod.bias.normal_()
    folded = fold_for_export(m)
    assert not any(isinstance(mod, WSConv2d) for mod in folded.modules())
    assert any(isinstance(mod, WSConv2d) for mod in m.modules())  # a copy: m is untouched
    args = _args()
    torch.testing.assert_close(folded(*args), m(*args), rtol=1e-5, atol=1e-5)


def test_batch_norm_statistics_reach_the_ema_weights(tmp_path):
    np.savez(tmp_path / "d.npz", **make_shapes(32, seed=2))
    cfg = TrainConfig(
        data=str(tmp_path / "d.npz"), out=str(tmp_path / "ck"), steps=3, batch_size=8,
        n_feat=8, sample_every=0, timesteps=50, norm="batch", activation="relu",
    )  # fmt: skip
    t = Trainer(cfg, load_dataset(tmp_path / "d.npz"))
    for _ in range(3):
        t.train_step()
    raw, ema = dict(t.model.named_buffers()), dict(t.ema.named_buffers())
    means = [k for k in raw if k.endswith("running_mean")]
    assert means
    for k in raw:
        torch.testing.assert_close(ema[k], raw[k], rtol=0, atol=0)
    # ... and they are trained statistics, not BatchNorm's initial zeros
    assert any(raw[k].abs().max() > 0 for k in means)


@pytest.mark.parametrize("norm", ["batch", "ws"])
def test_cli_trains_and_exports_a_plain_conv_relu_graph(tmp_path, shapes_npz, norm):
    ckpt, bundle = tmp_path / "ck", tmp_path / "b"
    run_cli(
        "train", "--data", str(shapes_npz), "--out", str(ckpt), "--steps", "4",
        "--batch-size", "16", "--n-feat", "16", "--sample-every", "0", "--no-progress",
        "--norm", norm, "--activation", "relu",
    )  # fmt: skip
    unet = json.loads((ckpt / "config.json").read_text())["unet"]
    assert (unet["norm"], unet["activation"]) == (norm, "relu")
    run_cli("export", str(ckpt), "--out", str(bundle))  # its parity check passes
    ops = Counter(n.op_type for n in onnx.load(bundle / "unet.onnx").graph.node)
    # BatchNorm folded into the convolutions, the standardisation into constant weights;
    # the blocks' GroupNorm (InstanceNormalization) and GELU (Erf) are gone.
    for op in ("BatchNormalization", "ReduceMean", "Sqrt"):
        assert ops[op] == 0, (op, ops)
    assert ops["InstanceNormalization"] == 2  # up0's and the output head's GroupNorm only
    assert ops["Relu"] >= 20 and ops["Erf"] <= 5, ops
    # The CPU int8 graph folds each block's ReLU into its QLinearConv's output range: no
    # float ReLU between a convolution and the next is left to dequantise around.
    # (the quantiser itself, on random calibration feeds: four steps of training leave a model
    # too rough for `ddpm-rt quantize`'s parity check, which is not what is tested here)
    from ddpm_rt import Bundle
    from ddpm_rt.export.variants import static_int8

    rng = np.random.default_rng(0)
    d = Bundle.load(bundle).context_dim
    calib = [
        {"x": rng.standard_normal((4, 3, 16, 16), np.float32),
         "t": rng.random((4, 1), np.float32), "c": rng.random((4, d), np.float32)}
        for _ in range(4)
    ]  # fmt: skip
    int8 = static_int8((bundle / "unet.onnx").read_bytes(), calib)
    q = Counter(n.op_type for n in onnx.load_from_string(int8).graph.node)
    assert q["QLinearConv"] >= 20 and q["Relu"] <= 2, q  # 2: after up0's and the head's GroupNorm
