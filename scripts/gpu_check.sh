#!/usr/bin/env bash
# The first real run of ddpm-rt's GPU path, in one go (about ten minutes): builds every
# TensorRT engine, rebuilds from the timing cache, survives a damaged timing cache, runs
# `ddpm-rt doctor`, the gpu/trt tests (from a source checkout), CUDA graphs on and off, two
# threads on one Generator, and ONNX Runtime's CUDA and TensorRT providers for each
# precision, checking which provider actually ran. A latent bundle's decoder goes through
# the same: every decoder engine TensorRT can build, the decoder on TensorRT (in slices of
# the profile) against ONNX Runtime CPU fp32 by the tolerance table, and which provider
# ran it. One line PASS/FAIL/SKIP per check, a final verdict, and one report file to send
# back.
#
#   scripts/gpu_check.sh [BUNDLE]          (default: the shipped model; a pixel or a
#                                           latent bundle)
#
# Needs: an NVIDIA GPU, ddpm-rt with the `trt` (or `trt-cu13`) extra; on a Jetson, JetPack's
# TensorRT bindings and cuda-python 12. Environment: PYTHON (default python3), REPORT
# (default ./ddpm-rt-gpu-report.txt). Nothing outside a temp folder is written but REPORT.
# Plain bash + coreutils, so it runs unchanged on a Jetson (JetPack 6, TensorRT 10.x).
set -u

PY=${PYTHON:-python3}
BUNDLE=${1:-$("$PY" -c 'from ddpm_rt.cli.generate import default_model; print(default_model())' 2>/dev/null)}
REPORT=${REPORT:-$PWD/ddpm-rt-gpu-report.txt}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ddpm-rt-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export DDPM_RT_CACHE="$WORK/cache" PYTHONWARNINGS=ignore
CACHE="$WORK/engines"
HERE=$(cd "$(dirname "$0")/.." && pwd)
PASSED=0
FAILED=0

ddpm() { "$PY" -m ddpm_rt.cli "$@"; }

: >"$REPORT"
log() { echo "$*" >>"$REPORT"; }

# check NAME COMMAND...: run it, PASS on exit 0, its output into the report
check() {
    local name=$1 start end rc
    shift
    start=$(date +%s)
    "$@" >"$WORK/out.txt" 2>&1
    rc=$?
    end=$(date +%s)
    if [ "$rc" -eq 0 ]; then
        result=PASS
        PASSED=$((PASSED + 1))
    elif [ "$rc" -eq 77 ]; then
        result=SKIP
    else
        result=FAIL
        FAILED=$((FAILED + 1))
    fi
    printf '%-4s %-52s %4ss\n' "$result" "$name" "$((end - start))" | tee -a "$REPORT"
    sed 's/^/    | /' "$WORK/out.txt" | tail -n 40 >>"$REPORT"
}

log "ddpm-rt GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
log "bundle: ${BUNDLE:-(ddpm-rt does not import: $PY -c 'import ddpm_rt')}"
log "host: $(uname -srm)"
[ -f /etc/nv_tegra_release ] && log "jetson: $(head -n 1 /etc/nv_tegra_release)"
command -v nvidia-smi >/dev/null && log "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 | tr '\n' ';')"
"$PY" - >>"$REPORT" 2>&1 <<'EOF'
import importlib, platform
print("python:", platform.python_version())
for name in ("ddpm_rt", "onnxruntime", "tensorrt", "cuda.bindings", "numpy"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__}: {e})")
try:
    import onnxruntime as ort
    print("onnxruntime providers:", ", ".join(ort.get_available_providers()))
    from ddpm_rt.backends.gpu import probe
    r = probe()
    print(f"CUDA driver {r.driver_version}, runtime {r.runtime_version}")
    for d in r.devices:
        print(f"GPU: {d['name']}, compute capability {d['compute_capability']}, {d['memory_gib']} GiB")
    if not r.gpu:
        print("GPU: none usable:", r.gpu_why)
except Exception as e:
    print("probe failed:", e)
EOF
log ""

# -- TensorRT engines ---------------------------------------------------------------------------
# the U-Net precisions this bundle has for TensorRT (an exported bundle has fp32 only)
UNET_PRECISIONS=$("$PY" -c 'import sys
from ddpm_rt import Bundle
from ddpm_rt.backends.trt_build import trt_precisions
print(",".join(trt_precisions(Bundle.load(sys.argv[1], hash_all=False).unet_precisions)))' "$BUNDLE" 2>/dev/null)
UNET_PRECISIONS=${UNET_PRECISIONS:-fp32}
build() {
    # every decoder engine of a latent bundle too ("all": the others skipped with the reason)
    ddpm build-engines "$BUNDLE" --engine-cache "$CACHE" --unet-precision "$UNET_PRECISIONS" \
        --decoder-precision all "$@"
}
check "build every engine ($UNET_PRECISIONS)" build
check "rebuild every engine from the timing cache" build --force

damaged_timing_cache() {
    local found
    found=$(find "$CACHE" -name timing.cache | head -n 1)
    [ -n "$found" ] || { echo "no timing.cache under $CACHE"; return 1; }
    printf 'not a timing cache' >"$found"
    out=$(ddpm build-engines "$BUNDLE" --engine-cache "$CACHE" --unet-precision fp32 --force 2>&1)
    rc=$?
    echo "$out"
    [ "$rc" -eq 0 ] || return 1
    echo "$out" | grep -q "damaged or from another GPU" || { echo "no word of the damaged cache"; return 1; }
    [ "$(head -c 18 "$found")" != "not a timing cache" ] || { echo "timing cache not replaced"; return 1; }
}
check "survive a damaged timing cache" damaged_timing_cache
check "ddpm-rt doctor" ddpm doctor "$BUNDLE" --engine-cache "$CACHE"

gpu_tests() {
    [ -f "$HERE/tests/test_gpu_path.py" ] || { echo "no tests/ here (not a source checkout)"; return 77; }
    "$PY" -c "import pytest" 2>/dev/null || { echo "pytest is not installed"; return 77; }
    (cd "$HERE" && "$PY" -m pytest -q -rs -m "gpu or trt" tests/test_gpu_path.py)
}
check "gpu/trt tests (pytest -m 'gpu or trt')" gpu_tests

# -- the trt backend: CUDA graphs, threads ---------------------------------------------------------
cat >"$WORK/checks.py" <<'EOF'
"""The Python-side checks; each exits 0 (pass), 1 (fail) or 77 (skip) and says why."""
import os, sys, threading
import numpy as np
from ddpm_rt import Generator

what, bundle, cache = sys.argv[1], sys.argv[2] or None, sys.argv[3]
from ddpm_rt.cli.generate import default_model
bundle = bundle or default_model()
KW = dict(num=3, seed=7, steps=8, sampler="ddim", eta=0.0)  # 3 images: slices at --max-batch 2
PROMPTS = ["red apple", "a dog"]


def trt(**kw):
    return Generator(bundle, backend="trt", engine_cache=cache, **kw)


def close(a, b, mean=1.0, p99=8):
    d = np.abs(a.astype(int) - b.astype(int))
    print(f"  mean |diff| {d.mean():.3f} levels, p99 {np.percentile(d, 99):.0f}")
    return d.mean() <= mean and np.percentile(d, 99) <= p99


if what == "graphs":
    os.environ.pop("DDPM_RT_CUDA_GRAPHS", None)
    off = trt().generate(PROMPTS, **KW)
    os.environ["DDPM_RT_CUDA_GRAPHS"] = "1"
    on = trt().generate(PROMPTS, **KW)
    same = np.array_equal(on, off)
    print("CUDA graphs on == off:", same)
    sys.exit(0 if same else 1)
if what == "threads":
    gen = trt()
    alone = [gen.generate(p, **KW) for p in PROMPTS]
    out, errors = {}, []

    def work(i):
        try:
            out[i] = gen.generate(PROMPTS[i], **KW)
        except Exception as e:  # report, do not hang
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in ts]
    [t.join(300) for t in ts]
    print("errors:", errors or "none")
    sys.exit(0 if not errors and all(close(out[i], alone[i], 0.05, 1) for i in range(2)) else 1)
if what == "decoder":
    from ddpm_rt import Bundle
    from ddpm_rt.backends import make_backend
    from ddpm_rt.backends.engine_cache import EngineCache
    from ddpm_rt.backends.trt_build import trt_decoder_precisions
    from ddpm_rt.parity import compare

    b = Bundle.load(bundle, hash_all=False)
    if b.latent is None:
        print("a pixel bundle: no decoder")
        sys.exit(77)
    buildable, why = trt_decoder_precisions(b)
    for p, reason in why.items():
        print(f"  {p}: not for TensorRT: {reason}")
    # 5 latents through engines built for 2: slices of 2, 2 and 1
    latents = np.random.default_rng(0).standard_normal((5, *b.sample_shape)).astype(np.float32)
    cpu = make_backend("ort", b)
    want = cpu.run(b.decoder_precisions["fp32"], {"latent": latents})["image"]
    gpu = make_backend("trt", b, engine_cache=EngineCache(cache))
    ok = True
    for p in buildable:
        got = gpu.run(b.decoder_precisions[p], {"latent": latents})["image"]
        passed, figures = compare(("trt", f"decoder-{p}"), [got], [want], np.ones(5, int), 1)
        print(f"  trt decoder {p}: {'ok' if passed else 'FAILED'} {figures}")
        ok &= passed
    gpu.close()
    sys.exit(0 if ok and buildable else 1)
if what.startswith("ort:"):
    _, provider, precision = what.split(":")
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        print(f"this onnxruntime has no {provider} (pip install onnxruntime-gpu)")
        sys.exit(77)
    from ddpm_rt import Bundle

    if precision not in Bundle.load(bundle, hash_all=False).unet_precisions:
        print(f"this bundle has no {precision} U-Net")
        sys.exit(77)
    providers = [provider, "CPUExecutionProvider"]
    if provider == "TensorrtExecutionProvider":
        providers.insert(1, "CUDAExecutionProvider")
    try:
        gpu = Generator(bundle, providers=providers, unet_precision=precision)
        images = gpu.generate(PROMPTS, **KW)
    except Exception as e:
        print(f"error: {e}")
        sys.exit(1)
    first = {}  # graph -> the provider it actually ran on first
    for graph in (gpu.unet_graph, gpu.decoder_graph):  # a latent bundle's decoder too
        if graph is not None:
            first[graph] = gpu.backend.session(graph).get_providers()[0]
    print("asked:", providers, "used first:", first)
    cpu = Generator(bundle, unet_precision=precision).generate(PROMPTS, **KW)
    on_it = all(p == provider for p in first.values())
    sys.exit(0 if on_it and close(images, cpu, 1.5, 12) else 1)
print("unknown check", what)
sys.exit(2)
EOF

# engines for 2 images (4 rows) only, so that 3 guided images (6 rows) run in slices
SMALL="$WORK/engines-small"
pycheck() { "$PY" "$WORK/checks.py" "$1" "$BUNDLE" "$SMALL"; }
ddpm build-engines "$BUNDLE" --engine-cache "$SMALL" --max-batch 2 --decoder-precision all >/dev/null 2>&1
check "CUDA graphs on and off give the same images" pycheck graphs
check "two threads on one Generator (trt)" pycheck threads
check "a latent bundle's decoder on TensorRT vs CPU" pycheck decoder

# -- ONNX Runtime's GPU providers ---------------------------------------------------------------
for provider in CUDAExecutionProvider TensorrtExecutionProvider; do
    for precision in fp32 fp16 int8-qdq; do
        check "ort $provider $precision" pycheck "ort:$provider:$precision"
    done
done

echo
if [ "$FAILED" -eq 0 ]; then
    verdict="VERDICT: PASS ($PASSED checks passed)"
else
    verdict="VERDICT: FAIL ($FAILED failed, $PASSED passed)"
fi
echo "$verdict" | tee -a "$REPORT"
echo "report: $REPORT (please send this file back)"
[ "$FAILED" -eq 0 ]
