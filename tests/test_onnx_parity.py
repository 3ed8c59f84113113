"""Layer 2: torch vs ONNX Runtime on the same inputs, per the tolerance table."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ddpm_rt.bundle.io_spec import unet_io
from ddpm_rt.export.onnx_export import (
    ExportError,
    check_unet_parity,
    trace_to_onnx,
    unet_parity_inputs,
)
from ddpm_rt.tolerances import check
from ddpm_rt.training.model import ContextUnet, UNetConfig


def _export(cfg: UNetConfig, conditioning: dict):
    torch.manual_seed(0)
    m = ContextUnet(cfg).eval()
    spec = unet_io(3, cfg.height, cfg.width, cfg.context_dim)
    ex = tuple(torch.from_numpy(v) for v in unet_parity_inputs(m, 2, conditioning).values())
    return m, trace_to_onnx(m, ex, spec, opset=17)


@pytest.mark.parametrize(
    "cfg,cond",
    [
        (UNetConfig(n_feat=64, context_dim=12), {"kind": "label"}),
        (UNetConfig(n_feat=32, context_dim=384, height=8, width=12), {"kind": "vector"}),
        # the capacity knobs: three blocks per level, attention at H/4, learned null context
        (
            UNetConfig(n_feat=16, context_dim=24, blocks=3, attention=True, null_context="learned"),
            {"kind": "vector"},
        ),
    ],
)
def test_unet_onnx_matches_torch(cfg, cond):
    m, onnx_bytes = _export(cfg, cond)
    report = check_unet_parity(m, onnx_bytes, cond, batches=(1, 8))
    assert [r["batch"] for r in report] == [1, 8] and all(r["ok"] for r in report)
    # An independent batch size through a plain session: the batch axis really is dynamic.
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    feeds = unet_parity_inputs(m, 5, cond, seed=42)
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        ref = m(*(torch.from_numpy(feeds[k]) for k in ("x", "t", "c"))).numpy()
    assert check("ort", "fp32", got, ref)[0]
    assert [i.name for i in sess.get_inputs()] == ["x", "t", "c"]
    assert [o.name for o in sess.get_outputs()] == ["eps"]


def test_tolerance_check_can_fail():
    ref = np.ones((2, 3), dtype=np.float32)
    assert check("ort", "fp32", ref + 5e-4, ref)[0]
    assert not check("ort", "fp32", ref + 2e-3, ref)[0]


def test_parity_failure_is_reported():
    cfg, cond = UNetConfig(n_feat=16, context_dim=4), {"kind": "label"}
    m, onnx_bytes = _export(cfg, cond)
    with torch.no_grad():  # the torch model drifts away from the exported graph
        m.out[-1].bias.add_(0.1)
    with pytest.raises(ExportError, match="differs from torch"):
        check_unet_parity(m, onnx_bytes, cond)


def test_quantize_adds_a_checked_int8_unet(trained, tmp_path):
    import shutil

    from ddpm_rt import Bundle, Generator
    from ddpm_rt.export.quantize import INT8_GRAPH, quantize_bundle

    b = tmp_path / "b"
    shutil.copytree(trained["bundle"], b)
    entry = quantize_bundle(b, log=lambda s: None)
    assert entry["checks"]["mean_cosine"] >= 0.98
    from ddpm_rt.backends import cpu_kernels

    assert entry["checks"]["cpu_family"] == cpu_kernels.family()  # where it was measured
    assert "7 bits (reduce_range" in entry["format"]
    bundle = Bundle.load(b)
    assert bundle.unet_precisions == {"fp32": "unet", "int8": INT8_GRAPH}
    gen = Generator(b, unet_precision="int8")
    assert gen.generate("red circle", num=2, sampler="ddim", steps=5).shape == (2, 16, 16, 3)


def test_fp16_variant_is_checked_and_close(trained, tmp_path):
    import shutil

    from ddpm_rt import Bundle, Generator
    from ddpm_rt.export.quantize import FP16_GRAPH, fp16_bundle

    b = tmp_path / "b"
    shutil.copytree(trained["bundle"], b)
    entry = fp16_bundle(b, log=lambda s: None)
    assert entry["checks"]["max_rel_l2"] < 1e-2
    assert Bundle.load(b).unet_precisions == {"fp32": "unet", "fp16": FP16_GRAPH}
    kw = {"num": 2, "sampler": "ddim", "steps": 5, "eta": 0.0, "seed": 4}
    a = Generator(b).generate("red circle", **kw).astype(int)
    h = Generator(b, unet_precision="fp16").generate("red circle", **kw).astype(int)
    assert np.abs(a - h).max() <= 3  # deterministic sampler: fp16 rounding only
