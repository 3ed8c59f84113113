"""Measuring helpers for ``ddpm-rt bench``: timing, the fp32 peak, FLOPs counted from a
graph, a child process's wall time and its own peak RSS."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ddpm_rt.extras import optional


def time_it(fn, repeats: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def time_round_robin(calls, repeats: int) -> list[float]:
    """Median seconds of each of ``calls``, timed in turn, one call each per round, for
    ``repeats`` rounds after a warm-up round: a slow or fast spell of a shared machine falls
    on all of them alike (ratios of these medians are what the bench compares)."""
    for fn in calls:  # warm each (sessions, arenas at this batch size)
        fn()
    rounds = np.array([[time_it(fn, 1, warmup=0)[0] for fn in calls] for _ in range(repeats)])
    return [float(v) for v in np.median(rounds, axis=0)]


def peak_gflops(threads: int | None, n: int = 1024) -> tuple[float | None, str | None]:
    """fp32 GFLOP/s of an n x n x n MatMul in ONNX Runtime (the machine's practical peak)."""
    onnx, why = optional("onnx", "export")
    if onnx is None:
        return None, why
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])],
        "mm",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    s = time_it(lambda: sess.run(None, {"a": a, "b": a}), 10)
    return 2 * n**3 / float(np.median(s)) / 1e9, None


def unet_flops(onnx_bytes: bytes, feeds: dict) -> tuple[float | None, str | None]:
    """FLOPs per image-step: 2 x the multiply-adds of Conv, ConvTranspose, Gemm and MatMul,
    from the real tensor shapes of one run at batch 1 (the graph's own shape inference loses
    dimensions after GroupNorm's reshapes)."""
    onnx, why = optional("onnx", "export")
    if onnx is None:
        return None, why
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    inits = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    nodes = [
        n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
    ]
    wanted = {name for n in nodes for name in (n.input[0], n.output[0])}
    wanted -= {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name in sorted(wanted):
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    shapes = {**{k: v.shape for k, v in outs.items()}, **{k: v.shape for k, v in feeds.items()}}
    total = 0
    for n in nodes:
        w = inits.get(n.input[1]) or shapes.get(n.input[1])
        inp, out = shapes[n.input[0]], shapes[n.output[0]]
        if n.op_type == "Conv":  # w: (Cout, Cin/groups, kh, kw)
            total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":  # w: (Cin, Cout/groups, kh, kw)
            total += 2 * int(np.prod(inp)) * int(np.prod(w[1:]))
        else:  # (..., K) x (K, N)
            total += 2 * int(np.prod(out)) * inp[-1]
    return float(total), None


# Runs a module as ``python -m`` would, then reports the process's own peak RSS (VmHWM).
# (wait4's ru_maxrss of a child started from this process counts the parent's pages it
# shared between fork and exec: hundreds of MB once torch is loaded here.)
WRAP = """
import os, runpy, sys
mod = sys.argv[1]
sys.argv = [mod, *sys.argv[2:]]
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
try:
    with open("/proc/self/status") as f:
        hwm = next(ln for ln in f if ln.startswith("VmHWM")).split()[1]
    os.write(2, ("\\nVMHWM_KB " + hwm + "\\n").encode())
except (OSError, StopIteration):
    pass
sys.exit(code)
"""


def run_measured(module: str, args: list[str], extra: tuple[str, ...] = ()) -> tuple:
    """Wall seconds, peak RSS (bytes) and stderr of ``python -m module args`` as a child."""
    cmd = [sys.executable, *extra, "-c", WRAP, module, *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{module} failed: {err.strip().splitlines()[-1:]}")
    hwm = [ln.split()[1] for ln in err.splitlines() if ln.startswith("VMHWM_KB ")]
    rss = int(hwm[-1]) * 1024 if hwm else usage.ru_maxrss * 1024
    return wall, rss, err


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cold_start(gen, prompt: str, default, repeats: int, torch_why) -> dict:
    """Process start -> PNG on disk, and peak RSS, of ``ddpm-rt --prompt`` at the defaults
    (loading every graph a run needs: text encoder, U-Net, a latent bundle's decoder) vs the
    torch script doing the same with the same weights."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "a.png")
        ours = [
            "--model",
            str(gen.bundle.path),
            "--prompt",
            prompt,
            "--out",
            out,
            "--force",
            "--no-progress",
        ]
        run_measured("ddpm_rt.cli", ours)  # a first run fills the optimised-graph cache
        runs = [run_measured("ddpm_rt.cli", ours) for _ in range(repeats)]
        # torch never imported on this path: ask the interpreter itself
        _, _, log = run_measured("ddpm_rt.cli", ours, ("-X", "importtime"))
        imported = {ln.split("|")[-1].strip() for ln in log.splitlines() if "|" in ln}
        result = {
            "ddpm_rt": {
                "decoder": gen.decoder_precision,  # a latent bundle's: loaded and run too
                "seconds": float(np.median([r[0] for r in runs])),
                "peak_rss_mb": max(r[1] for r in runs) / 2**20,
                "torch_imported": any(m == "torch" or m.startswith("torch.") for m in imported),
            }
        }
        if torch_why:
            result["torch_script"] = {"skipped": torch_why}
            return result
        theirs = [
            "--bundle",
            str(gen.bundle.path),
            "--prompt",
            prompt,
            "--out",
            out,
            "--sampler",
            default.sampler,
            "--guidance",
            str(default.guidance),
        ]
        if default.steps:
            theirs += ["--steps", str(default.steps)]
        try:
            runs = [
                run_measured("ddpm_rt.training.torch_reference", theirs) for _ in range(repeats)
            ]
        except RuntimeError as e:
            result["torch_script"] = {"skipped": str(e)}
            return result
        result["torch_script"] = {
            "seconds": float(np.median([r[0] for r in runs])),
            "peak_rss_mb": max(r[1] for r in runs) / 2**20,
        }
        result["speedup"] = result["torch_script"]["seconds"] / result["ddpm_rt"]["seconds"]
        return result
