"""``ddpm-rt doctor``: what this machine can run, why not where it cannot, and proof where it can.

1. Versions, and every backend with its precisions: usable here, or exactly why not (a
   missing package, no GPU, a driver older than the CUDA runtime, an engine built for
   another GPU or TensorRT).
2. For every usable backend and every precision the bundle has: eps on x_t recorded along
   real trajectories against ONNX Runtime CPU fp32, under the tolerance table
   (:mod:`ddpm_rt.tolerances`); one full seeded generation against ONNX Runtime CPU fp32
   (:data:`IMAGE_TOLERANCES`); the U-Net's per-step latency at batch 1 and 8.
   With a GPU and TensorRT, the engines are built first (``ddpm-rt build-engines``).
3. A latent bundle's decoder, every precision it has on every usable backend, on latents
   recorded at t = 1 of those trajectories, against ONNX Runtime CPU fp32 under the table's
   ``decoder-<precision>`` entries; what cannot run here is listed with the reason.

Exit status 0 when every check that could run passed, 1 when one failed.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ddpm_rt import __version__
from ddpm_rt.backends import cpu_kernels, gpu, make_backend
from ddpm_rt.bundle.bundle import Bundle
from ddpm_rt.errors import DdpmRtError
from ddpm_rt.generator import Generator
from ddpm_rt.parity import compare, record_in_use
from ddpm_rt.tolerances import TOLERANCES, base_precision

# A full seeded generation (the default sampler, 4 prompts) against ONNX Runtime CPU fp32:
# mean and 99th-percentile absolute difference in 8-bit levels. fp32 elsewhere (another CPU,
# a GPU with TF32) differs by rounding only: the golden test's tolerance. fp16 changes eps by
# ~3e-3 (the tolerance table); measured with ``ddpm-rt doctor`` (x86_64 CPU, ONNX Runtime
# 1.32): fp16 mean 0.1, p99 1; the limits leave more (a GPU's fp16 kernels round
# differently). int8 changes eps by ~1 %, and guidance (eps_u + g (eps_c - eps_u), errors
# ~2.2x at g = 2) and a stochastic 8-step sampler carry that into visibly moved pixels: on
# the 40,000-step everyday model at its default, int8 differs from fp32 by mean 7.9-9.4
# levels (Q/DQ 9.9-11.4), p99 60-104, over seeds 0-3, while the judge scores the variants
# within one standard error of fp32 (MODEL_CARD.md). So int8 is measured against the scale
# that matters, the gap between two concepts: the fp32 images of the four prompts against
# each other (image i vs image i-1, same seed), 48-56 levels. Measured in those units: int8
# 0.16-0.18, Q/DQ 0.19-0.23, fp32 at the next seed (same prompts, another picture)
# 0.40-0.53, the previous 107-concept model's int8 graph (a wrong graph) 0.59-0.64.
IMAGE_TOLERANCES = {
    "fp32": {"mean": 1.0, "p99": 8.0},
    "fp16": {"mean": 2.0, "p99": 16.0},
    "int8": {"of_concept_gap": 0.35},
    "int8-qdq": {"of_concept_gap": 0.35},
}


def image_check(
    precision: str, diff: np.ndarray, concept_gap: float
) -> tuple[bool, float, float, float]:
    """(ok, mean, p99, mean limit) of absolute pixel differences against the fp32 reference."""
    lim = IMAGE_TOLERANCES[base_precision(precision)]  # a distilled variant: its base's
    mean, p99 = float(diff.mean()), float(np.percentile(diff, 99))
    mean_limit = lim["mean"] if "mean" in lim else lim["of_concept_gap"] * concept_gap
    return mean <= mean_limit and p99 <= lim.get("p99", np.inf), mean, p99, mean_limit


PROMPTS = ("red apple", "a snowman", "thumbs up", "a cup of coffee")


def prompts_for(bundle: Bundle) -> list[str]:
    """The prompts doctor generates: :data:`PROMPTS`, or a label bundle's first labels."""
    if bundle.conditioning["kind"] == "label":
        return list(bundle.label_names[: len(PROMPTS)])
    return list(PROMPTS)


def recorded_families(bundle: Bundle) -> dict[str, str]:
    """What each CPU-side figure of the bundle says about where it was measured: ``U-Net
    <precision>`` / ``text encoder int8`` -> its recorded ``cpu_family`` (``"not recorded"``
    for figures written before it was recorded)."""

    def family(checks) -> str:  # informational fields: any type may come in a bundle
        fam = checks.get("cpu_family") if isinstance(checks, dict) else None
        return fam[:80] if isinstance(fam, str) else "not recorded"

    out = {}
    for p, entry in bundle.manifest.get("unet_precisions", {}).items():
        if "checks" in entry:
            out[f"U-Net {p}"] = family(entry["checks"])
    text = bundle.conditioning.get("text") or {}
    if "int8" in (text.get("graphs") or {}):
        out["text encoder int8"] = family(text.get("checks"))
    return out


def cpu_family_notes(bundle: Bundle, rows: list[tuple]) -> list[str]:
    """Lines saying, for each figure recorded on another CPU kernel family than this one's,
    that this report measured it here, and, for a CPU int8 row that failed, what to use."""
    here = cpu_kernels.family()
    lines = [f"this CPU: {here} ({cpu_kernels.describe(here)})"]
    failed = {p for b, p, what, *_ in rows if b == "ort" and not what.startswith(("ok", "ref"))}
    for what, fam in recorded_families(bundle).items():
        if fam == here:
            continue
        where = (
            "do not say on which CPU family they were measured"
            if fam == "not recorded"
            else f"were measured on {fam}, not on this CPU's family"
        )
        here_too = "its contexts above are" if what.startswith("text") else "the rows above are"
        lines.append(f"{what}: its figures in the manifest {where}: {here_too} this CPU's")
        precision = what.split()[-1]
        if what.startswith("U-Net") and precision in failed:
            family = _family(precision)  # a distilled variant is re-made from its own U-Net
            of = f" --of {family}" if family != "fp32" else ""
            lines.append(
                f"  {precision} misses its check on this CPU: use --precision {family} here, or "
                f"re-quantise it (ddpm-rt quantize {bundle.path} --precision "
                f"{base_precision(precision)}{of} --force), which writes 7-bit weights that "
                "every CPU family computes alike"
            )
    return lines


def _latency(run: Callable[[], object], repeats: int = 20) -> float:
    run()  # warm-up (and engine/context creation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


# The U-Nets each other precision is checked against: the fp32 one, and a distilled U-Net
# (issue 29) for its own variants -- on ONNX Runtime's CPU, where they are the reference.
REFERENCES = ("fp32", "distilled")
# The U-Net variants ONNX Runtime's CUDA provider runs (not the CPU's QOperator int8 graphs).
ORT_GPU_PRECISIONS = (
    "fp32",
    "fp16",
    "int8-qdq",
    "distilled",
    "distilled-fp16",
    "distilled-int8-qdq",
)


def _candidates(report: gpu.GpuReport, variants: dict) -> list[tuple[str, str, dict]]:
    """(table key backend, precision, Generator keywords) for every usable combination."""
    out = []
    for p in variants:
        if p not in REFERENCES:
            out.append(("ort", p, {"unet_precision": p}))
    if "CUDAExecutionProvider" in report.ort_providers and report.gpu:
        prov = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        for p in ORT_GPU_PRECISIONS:
            if p in variants:
                out.append(("ort-gpu", p, {"unet_precision": p, "providers": prov}))
    if report.tensorrt_version and report.gpu and not report.cuda_python_why:
        from ddpm_rt.backends.trt_build import trt_precisions

        for p in trt_precisions(variants):
            out.append(("trt", p, {"unet_precision": p, "backend": "trt"}))
    return out


GPU_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _decoder_candidates(bundle: Bundle, report: gpu.GpuReport, engine_cache) -> tuple[list, list]:
    """([(table key backend, precision, graph, make backend)], [(what, why skipped)]) for a
    latent bundle's decoder variants on every backend of this machine."""
    from ddpm_rt.backends.trt_build import trt_decoder_precisions

    decoders = bundle.decoder_precisions
    runs, skipped = [], []
    for p, graph in decoders.items():
        if p != "fp32":
            runs.append(("ort", p, graph, lambda: make_backend("ort", bundle)))
    if "CUDAExecutionProvider" in report.ort_providers and report.gpu:
        from ddpm_rt.backends import tensorrt_graphs

        on_trt = tensorrt_graphs(bundle)  # the int8 decoder only as a Q/DQ graph
        for p, graph in decoders.items():
            if p == "int8" and graph not in on_trt:
                skipped.append((f"ort-gpu decoder {p}", "not a Q/DQ graph"))
                continue
            runs.append(("ort-gpu", p, graph, lambda: make_backend("ort", bundle, GPU_PROVIDERS)))
    elif "CUDAExecutionProvider" not in report.ort_providers:
        skipped.append(("ort-gpu decoder", "this onnxruntime has no CUDAExecutionProvider"))
    else:
        skipped.append(("ort-gpu decoder", report.gpu_why or "no CUDA GPU"))
    trt_why = report.tensorrt_why or report.cuda_python_why or (None if report.gpu else "no GPU")
    if trt_why:
        skipped.append(("trt decoder", trt_why))
    else:
        buildable, not_built = trt_decoder_precisions(bundle)
        skipped += [(f"trt decoder {p}", why) for p, why in not_built.items() if p in decoders]
        from ddpm_rt.backends.engine_cache import EngineCache

        cache = EngineCache(engine_cache) if engine_cache else None  # where doctor built them
        for p in buildable:
            runs.append(
                ("trt", p, decoders[p], lambda: make_backend("trt", bundle, engine_cache=cache))
            )
    return runs, skipped


def check_decoders(
    bundle: Bundle,
    report: gpu.GpuReport,
    ref: Generator,
    latents: np.ndarray,
    engine_cache=None,
    log: Callable[[str], None] = print,
) -> int:
    """The decoder section of the report; returns the number of failed checks."""
    ref_graph = bundle.decoder_precisions["fp32"]
    want = ref.backend.run(ref_graph, {"latent": latents})["image"]  # (B, 3, H, W)
    one = {"latent": latents[:1]}
    rows = [("ort", "fp32", "reference", _latency(lambda: ref.backend.run(ref_graph, one)))]
    runs, skipped = _decoder_candidates(bundle, report, engine_cache)
    failed = 0
    for backend_name, precision, graph, make in runs:
        key = (backend_name, f"decoder-{precision}")
        if key not in TOLERANCES:
            skipped.append((f"{backend_name} decoder {precision}", "no tolerance-table entry"))
            continue
        try:
            backend = make()
            try:
                got = backend.run(graph, {"latent": latents})["image"]
                ok, figures = compare(key, [got], [want], np.ones(len(got), int), 1)
                ms = _latency(lambda b=backend, g=graph: b.run(g, one))
            finally:
                if hasattr(backend, "close"):
                    backend.close()  # TensorRT's device buffers
        except DdpmRtError as e:
            log(f"decoder {backend_name} {precision}: FAILED: {e}")
            failed += 1
            continue
        failed += not ok
        what = ", ".join(f"{k} {v:.3g}" for k, v in figures.items())
        rows.append((backend_name, precision, f"{'ok' if ok else 'FAILED'}: {what}", ms))
    log("")
    log(f"decoder ({len(latents)} latents at t = 1)  ms b1   check vs ort fp32 decoder")
    for backend_name, precision, what, ms in rows:
        log(f"{backend_name:<8} {precision:<10} {ms:>12.2f}   {what}")
    for what, why in skipped:
        log(f"skipped: {what}: {why}")
    return failed


def _log_machine(log: Callable[[str], None]) -> gpu.GpuReport:
    """Section 1: versions, GPUs, and every backend usable here or why not."""
    import onnxruntime as ort

    log(
        f"ddpm-rt {__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"numpy {np.__version__}, onnxruntime {ort.__version__} "
        f"(providers: {', '.join(ort.get_available_providers())})"
    )
    report = gpu.probe()
    if report.devices:
        for d in report.devices:
            cc = ".".join(map(str, d["compute_capability"]))
            log(f"GPU: {d['name']}, compute capability {cc}, {d['memory_gib']} GiB")
        log(f"CUDA driver {report.driver_version}, runtime {report.runtime_version}")
    else:
        log(f"GPU: none usable ({report.gpu_why})")
    log(f"TensorRT: {report.tensorrt_version or report.tensorrt_why}")
    log("")
    log("backend                              usable  precisions / why not")
    for row in gpu.backend_status(report):
        why = row["precisions"] if row["usable"] else row["why"]
        log(f"{row['backend']:<36} {'yes' if row['usable'] else 'no':<7} {why}")
    log("")
    return report


@dataclass
class _Reference:
    """A U-Net of :data:`REFERENCES` on ONNX Runtime's CPU: what the other backends and
    precisions of its family are compared with."""

    gen: Generator
    feeds: list  # U-Net inputs recorded along real trajectories, batches of 8
    ts: np.ndarray  # their timesteps
    T: int
    eps: list  # the reference's eps on each feed
    prompts: list  # what the seeded generation is of (prompts_for)
    images: np.ndarray  # one seeded generation of the prompts, int16
    concept_gap: float  # mean difference between two prompts' images
    one: dict  # a feed of batch 1, for latency


def _reference(bundle: Bundle, precision: str = "fp32") -> _Reference:
    """The reference of ``precision``'s family, its feeds recorded where that U-Net runs in
    use (:func:`ddpm_rt.parity.record_in_use`: a distilled one along its own few steps,
    with w)."""
    ref = Generator(bundle, unet_precision=precision)
    prompts = prompts_for(bundle)
    contexts = np.stack([ref.context(p) for p in prompts * 2])
    T = ref.schedule.timesteps
    feeds = record_in_use(ref, contexts, every=max(1, T // 40), batch=8)  # quantize's spacing
    ts = np.concatenate([np.rint(f["t"][:, 0] * T).astype(int) for f in feeds])
    ref_eps = [ref.backend.run(ref.unet_graph, f)["eps"] for f in feeds]
    ref_images = ref.generate(prompts, num=1, seed=0).astype(np.int16)
    concept_gap = float(np.abs(ref_images - np.roll(ref_images, 1, axis=0)).mean())
    one = {k: v[:1] for k, v in feeds[0].items()}
    return _Reference(ref, feeds, ts, T, ref_eps, prompts, ref_images, concept_gap, one)


def _family(precision: str) -> str:
    """The reference a precision is checked against (:data:`REFERENCES`)."""
    return "distilled" if precision.startswith("distilled") else "fp32"


def _reference_latency(r: _Reference) -> tuple[float, float]:
    """The reference U-Net's ms per step at batch 1 and 8."""
    gen = r.gen
    return (
        _latency(lambda: gen.backend.run(gen.unet_graph, r.one)),
        _latency(lambda: gen.backend.run(gen.unet_graph, r.feeds[0])),
    )


def _build_trt_engines(
    bundle: Bundle, variants: dict, engine_cache, log: Callable[[str], None]
) -> int:
    """TensorRT engines for every precision doctor checks; returns 1 if building failed."""
    from ddpm_rt.backends.engine_cache import EngineCache
    from ddpm_rt.backends.trt_build import build_engines, trt_precisions

    wanted = trt_precisions(variants)
    try:
        cache = EngineCache(engine_cache) if engine_cache else None
        build_engines(bundle, wanted, cache, log=log, decoders="all")
    except DdpmRtError as e:
        log(f"building TensorRT engines failed: {e}")
        return 1
    return 0


def _check_unet(
    gen: Generator, backend: str, precision: str, r: _Reference
) -> tuple[bool, str, float, float]:
    """Section 2 for one backend (its tolerance-table key) and precision: (passed, what the
    table says, ms at batch 1, ms at batch 8)."""
    x1 = r.feeds[0]
    got = [gen.backend.run(gen.unet_graph, f)["eps"] for f in r.feeds]
    ok, figures = compare((backend, precision), got, r.eps, r.ts, r.T)
    images = gen.generate(r.prompts, num=1, seed=0)
    diff = np.abs(images.astype(np.int16) - r.images)
    img_ok, mean, p99, mean_limit = image_check(precision, diff, r.concept_gap)
    b1 = _latency(lambda gen=gen: gen.backend.run(gen.unet_graph, r.one))
    b8 = _latency(lambda gen=gen: gen.backend.run(gen.unet_graph, x1))
    verdict = "ok" if ok and img_ok else "FAILED"
    eps_txt = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
    what = (
        f"{verdict}: eps {eps_txt}; image mean {mean:.2f} (limit {mean_limit:.1f})"
        f" p99 {p99:.0f} levels"
    )
    return verdict == "ok", what, b1, b8


def run_doctor(
    bundle_path,
    engine_cache=None,
    build: bool = True,
    log: Callable[[str], None] = print,
) -> int:
    report = _log_machine(log)
    bundle = Bundle.load(bundle_path)  # every file hashed
    variants = bundle.unet_precisions
    decoders = (
        f"; decoder precisions {', '.join(bundle.decoder_precisions)}" if bundle.latent else ""
    )
    log(f"bundle {bundle.path}: U-Net precisions {', '.join(variants)}{decoders}")
    refs = {p: _reference(bundle, p) for p in REFERENCES if p in variants}
    rows = [("ort", p, "reference", *_reference_latency(r)) for p, r in refs.items()]
    r = refs["fp32"]
    failed = 0
    if build and report.tensorrt_version and report.gpu and not report.cuda_python_why:
        failed += _build_trt_engines(bundle, variants, engine_cache, log)
    for backend, precision, kw in _candidates(report, variants):
        try:
            gen = Generator(bundle, engine_cache=engine_cache, **kw)
            ok, what, b1, b8 = _check_unet(gen, backend, precision, refs[_family(precision)])
        except DdpmRtError as e:
            log(f"{backend} {precision}: FAILED: {e}")
            failed += 1
            continue
        failed += not ok
        rows.append((backend, precision, what, b1, b8))
    log("")
    also = ", distilled-* vs ort distilled" if "distilled" in refs else ""
    log(f"backend  precision  U-Net ms/step b1   b8   check vs ort fp32{also} (tolerance table)")
    width = max(10, *(len(row[1]) for row in rows))  # distilled-int8-qdq: 18
    for backend, precision, what, b1, b8 in rows:
        log(f"{backend:<8} {precision:<{width}} {b1:>12.2f} {b8:>6.2f}   {what}")
    for line in cpu_family_notes(bundle, rows):
        log(line)
    if bundle.latent is not None:
        latents = np.concatenate([f["x"] for f in r.feeds])[r.ts == 1]  # (B, C, h, w), ~x_0
        failed += check_decoders(bundle, report, r.gen, latents, engine_cache, log)
    if not report.gpu:
        log("")
        log(f"only the CPU backend (ONNX Runtime) is usable here: {report.gpu_why}")
    log("")
    log("all checks passed" if not failed else f"{failed} check(s) FAILED")
    sys.stdout.flush()
    return 1 if failed else 0
