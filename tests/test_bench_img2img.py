"""Issue 28's cost figure: ``ddpm-rt bench``'s end-to-end rows for image-to-image at strength
0.3/0.5/0.7, each timed call for call beside text-to-image (the ratio should be about the
strength: the run takes the last int(strength x steps) steps)."""

from __future__ import annotations

from collections import Counter

from ddpm_rt import Generator
from ddpm_rt.tools.bench import IMG2IMG_STRENGTHS, format_bench, run_bench


def test_bench_times_image_to_image_beside_text_to_image(tmp_path):
    from craft import write_bundle

    gen = Generator(write_bundle(tmp_path / "b"), threads=1)
    calls = Counter()
    real = gen.generate

    def spy(*a, config=None, init_image=None, **kw):
        calls[(config.strength if config else None, init_image is not None)] += 1
        return real(*a, config=config, init_image=init_image, **kw)

    gen.generate = spy
    r = run_bench(gen, (1,), 20, None, ("e2e",), False)
    e2e = r["end_to_end_1_image"]
    for s in IMG2IMG_STRENGTHS:
        row = e2e[f"default img2img {s:g}"]
        assert row["seconds"] > 0 and row["images_per_s"] == 1 / row["seconds"]
        assert 0 < row["vs_text_to_image"] < 5
        assert calls[(s, True)] == 3 + 1  # max(3, repeats // 10) timed, one to warm up
    assert "default img2img 0.5" in format_bench(r) and "of text-to-image" in format_bench(r)
