"""Issue 29 item 4, the distilled U-Net measured beside today's default: ``ddpm-rt bench``'s
end-to-end rows for each distilled variant (its own recommended settings, every bench batch
size, timed round-robin with the default; U-Net rows per image, the ratio line, the JSON) and
``ddpm-rt eval``'s ``recommended@PRECISION`` and cost column. The tiny teacher and its 2-step
student of test_distilled_bundle (module fixtures); no timed thresholds."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from ddpm_rt.config import GenerateConfig
from ddpm_rt.generator import Generator
from tests.conftest import run_cli
from tests.test_distilled_bundle import Counting, bundles, ckpts  # noqa: F401 - fixtures


def _rows_per_image(bundle, precision: str, **settings) -> float:
    """U-Net rows one image costs, counted on the backend (3 images in one call)."""
    gen = Generator(bundle, unet_precision=precision)
    calls = Counting(gen.backend, gen.unet_graph)
    gen.backend = calls
    gen.generate("red circle", num=3, seed=0, **settings)
    return sum(len(c["x"]) for c in calls.calls) / 3


def test_bench_times_the_distilled_unet_beside_the_default(bundles, tmp_path):  # noqa: F811
    """``--sections e2e --batch-sizes 1,3``: a default row and a distilled row at each batch
    size, each at its own recommended settings, U-Net rows per image as counted on the
    backend (16 for the default's DDIM-8 at guidance 2, 2 for the student's 2 steps with w),
    the ratios of the medians, and the ratio line."""
    out = tmp_path / "bench.json"
    proc = run_cli("bench", str(bundles / "both"), "--sections", "e2e", "--batch-sizes", "1,3",
                   "--repeats", "1", "--no-compile", "--json", str(out))  # fmt: skip
    e = json.loads(out.read_text())["end_to_end_distilled"]
    assert list(e["rows"]) == ["default", "distilled"]
    default, distilled = e["rows"]["default"], e["rows"]["distilled"]
    want = {"sampler": "ddim", "steps": 8, "eta": 1.0, "guidance": 2.0, "unet_precision": "fp32"}
    assert {k: default[k] for k in want} == want
    want = {"sampler": "ddim", "steps": 2, "eta": 0.0, "guidance": 2.0}
    assert {k: distilled[k] for k in want} == want
    assert distilled["unet_precision"] == "distilled"
    assert default["unet_rows_per_image"] == 16 == _rows_per_image(bundles / "both", "fp32")
    assert distilled["unet_rows_per_image"] == 2 == _rows_per_image(bundles / "both", "distilled")
    for row in (default, distilled):
        assert [f["batch"] for f in row["batches"]] == [1, 3]
        for f in row["batches"]:
            assert f["seconds"] > 0 and f["images_per_s"] == pytest.approx(
                f["batch"] / f["seconds"]
            )
    for d, s in zip(default["batches"], distilled["batches"], strict=True):
        assert s["vs_default"] == pytest.approx(d["seconds"] / s["seconds"])
        assert "vs_default" not in d
    assert e["vs_default"] == {
        "distilled": {f"batch_{s['batch']}": s["vs_default"] for s in distilled["batches"]}
    }
    assert re.search(r"^distilled vs default e2e: batch 1 \d+\.\d\dx, batch 3 \d+\.\d\dx$",
                     proc.stdout, re.M)  # fmt: skip
    assert re.search(r"^distilled +ddim-2 eta 0 g2 +2 +3 ", proc.stdout, re.M)
    assert re.search(r"^default fp32 +ddim-8 eta 1 g2 +16 +1 ", proc.stdout, re.M)


def test_bench_rows_one_per_distilled_precision_none_without(bundles, tmp_path):  # noqa: F811
    """A second distilled precision (the same graph listed again as distilled-int8) gets its
    own row; a bundle without a distilled U-Net gets no such section."""
    from ddpm_rt.tools.bench_distilled import distilled_end_to_end

    shutil.copytree(bundles / "both", tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    m = json.loads(path.read_text())
    m["unet_precisions"]["distilled-int8"] = m["unet_precisions"]["distilled"]
    path.write_text(json.dumps(m))
    gen = Generator(tmp_path / "b")
    default = GenerateConfig().with_defaults(gen.bundle.recommended)
    e = distilled_end_to_end(gen, default, "red circle", (2,), 1)
    assert list(e["rows"]) == ["default", "distilled", "distilled-int8"]
    assert [e["rows"][p]["unet_rows_per_image"] for p in e["rows"]] == [16, 2, 2]
    assert list(e["vs_default"]) == ["distilled", "distilled-int8"]
    assert list(e["vs_default"]["distilled-int8"]) == ["batch_2"]
    plain = Generator(bundles / "plain")
    assert distilled_end_to_end(plain, default, "red circle", (1,), 1) is None
