"""``ddpm-rt bench``: ddpm-rt against the PyTorch way, side by side in one run.

Speed targets live here, not in timed tests: every figure is a median of repeated runs on
this machine, and comparisons are ratios measured in the same run. Sections:

1. the machine's fp32 peak, from a large ONNX Runtime MatMul (NumPy's BLAS reads far lower);
2. the U-Net's FLOPs per image-step, counted from the graph;
3. per-step latency and images/s at each batch size for torch eager, torch.compile (same
   weights, parity-checked first), ddpm-rt fp32 and int8, with the fraction of the peak;
4. end to end, one image at batch 1: the course's torch DDPM-500 loop vs ddpm-rt at its
   default and at every sampler/step row of the evaluation grid;
5. the sampler's own overhead per step (everything but the U-Net call);
6. cold start (process start -> PNG on disk) and peak RSS of ``ddpm-rt --prompt`` at the
   defaults vs a torch script doing the same with the same weights; torch never imported.

Rows that need torch (``train`` extra) or onnx (``export`` extra) are skipped with the
reason when those are missing. The torch code lives in ddpm_rt.training.torch_reference,
imported lazily for those rows only: the runtime itself never imports torch.
"""

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

from .config import GenerateConfig
from .errors import first_line
from .pipeline import Generator
from .samplers import EVAL_GRID, make_sampler

PROMPT = "red apple"


def _prompt(gen: Generator) -> str:
    """What to ask for: "red apple" for a text bundle, else its first label (or nothing)."""
    if gen.text is not None:
        return PROMPT
    return (gen.bundle.label_names or [""])[0]


def _time(fn, repeats: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def _need(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module), None
    except ImportError as e:
        return None, f"needs {e.name} (pip install 'ddpm-rt[{extra}]')"


def peak_gflops(threads: int | None, n: int = 1024) -> tuple[float | None, str | None]:
    """fp32 GFLOP/s of an n x n x n MatMul in ONNX Runtime (the machine's practical peak)."""
    onnx, why = _need("onnx", "export")
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
    s = _time(lambda: sess.run(None, {"a": a, "b": a}), 10)
    return 2 * n**3 / float(np.median(s)) / 1e9, None


def unet_flops(onnx_bytes: bytes, feeds: dict) -> tuple[float | None, str | None]:
    """FLOPs per image-step: 2 x the multiply-adds of Conv, ConvTranspose, Gemm and MatMul,
    from the real tensor shapes of one run at batch 1 (the graph's own shape inference loses
    dimensions after GroupNorm's reshapes)."""
    onnx, why = _need("onnx", "export")
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


def _torch_model(gen: Generator, checkpoint):
    """(torch module, torch_reference module, None) or (None, None, why not)."""
    torch, why = _need("torch", "train")
    if torch is None:
        return None, None, why
    ref, why = _need("ddpm_rt.training.torch_reference", "train,export")
    if ref is None:
        return None, None, why
    try:
        return ref.model_from_bundle(gen.bundle.path, checkpoint), ref, None
    except Exception as e:  # a bundle without a recorded config, unmapped weights
        return None, None, f"cannot rebuild the torch U-Net: {e}"


def _torch_rows(gen: Generator, batch_sizes, repeats, torch_model, compile_: bool, flops, peak):
    """Per-step rows for torch eager and torch.compile, after a parity check against ddpm-rt
    fp32 (the torch code itself lives in ddpm_rt.training.torch_reference)."""
    from .tolerances import check

    model, ref, _ = torch_model
    c, h, w = gen.bundle.image_shape
    d = gen.bundle.context_dim
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, c, h, w), dtype=np.float32)
    ctx = rng.standard_normal((8, d)).astype(np.float32)
    ctx /= np.linalg.norm(ctx, axis=1, keepdims=True)
    t = max(1, gen.schedule.timesteps // 2)
    want = ref.eps(model, x, t / gen.schedule.timesteps, ctx)
    ok, excess = check("ort", "fp32", gen.eps(x, t, ctx), want)
    if not ok:
        return {"skipped": f"torch and ONNX Runtime disagree (excess {excess:.2e}): refused"}
    rows = {"parity": "torch vs ddpm-rt fp32 within the tolerance table"}
    variants = {"torch eager": model}
    if not compile_:
        rows["torch.compile"] = {"skipped": "not asked for (--no-compile)"}
    else:
        try:
            variants["torch.compile"] = ref.compiled(model)
        except Exception as e:
            rows["torch.compile"] = {"skipped": f"torch.compile unavailable: {e}"}
    for name, net in variants.items():
        out = []
        for b in batch_sizes:
            xb = rng.standard_normal((b, c, h, w), dtype=np.float32)
            run = ref.runner(net, xb, 0.5, np.repeat(ctx[:1], b, axis=0))
            try:
                s = _time(run, repeats, warmup=5)
            except Exception as e:  # torch.compile needs a C++ toolchain at first call
                out = {"skipped": f"{name} failed: {first_line(e)[:120]}"}
                break
            out.append(_row(b, s, flops, peak))
        rows[name] = out
    return rows


def _row(b: int, s: np.ndarray, flops, peak, fp32: bool = True) -> dict:
    med = float(np.median(s))
    row = {
        "batch": b,
        "ms_per_step": 1e3 * med,
        "p90_ms": 1e3 * float(np.percentile(s, 90)),
        "images_per_s_per_step": b / med,
    }
    if flops and peak and fp32:  # an int8 graph is not bound by the fp32 peak
        row["fraction_of_peak"] = flops * b / med / 1e9 / peak
    return row


def _ort_rows(gen: Generator, batch_sizes, repeats, flops, peak) -> list[dict]:
    fp32 = gen.unet_precision == "fp32"
    c, h, w = gen.bundle.image_shape
    rng = np.random.default_rng(0)
    ctx1 = gen.context(_prompt(gen))
    out = []
    t = max(1, gen.schedule.timesteps // 2)
    for b in batch_sizes:
        x = rng.standard_normal((b, c, h, w), dtype=np.float32)
        ctx = np.repeat(ctx1[None].astype(np.float32), b, axis=0)
        s = _time(lambda x=x, ctx=ctx: gen.eps(x, t, ctx), repeats)
        out.append(_row(b, s, flops, peak, fp32))
    return out


def _end_to_end(gen: Generator, default: GenerateConfig, torch_model, repeats: int) -> dict:
    ctx = gen.context(_prompt(gen))
    rows = {}
    settings = [("default", default)]
    for name, steps, eta in EVAL_GRID:
        if steps is None or steps <= gen.schedule.timesteps:
            settings.append(
                (
                    f"{name}-{steps or gen.schedule.timesteps}"
                    + (f" eta {eta:g}" if eta is not None else ""),
                    GenerateConfig(sampler=name, steps=steps, eta=eta),
                )
            )
    for label, cfg in settings:
        s = _time(lambda cfg=cfg: gen.generate(context=ctx, config=cfg), repeats, warmup=1)
        rows[label] = {"seconds": float(np.median(s)), "images_per_s": 1 / float(np.median(s))}
    model, ref, why = torch_model
    if model is None:
        rows["torch course DDPM"] = {"skipped": why}
        return rows
    c = ctx[None].astype(np.float32)
    s = _time(lambda: ref.course_ddpm(model, c, gen.schedule), max(1, repeats), warmup=1)
    base = float(np.median(s))
    rows[f"torch course DDPM-{gen.schedule.timesteps}"] = {
        "seconds": base,
        "images_per_s": 1 / base,
    }
    for r in rows.values():
        r["vs_torch_course"] = base / r["seconds"]
    return rows


def _overhead(gen: Generator, cfg: GenerateConfig, repeats: int) -> dict:
    """Per step at batch 1: the whole step vs the U-Net call alone."""
    ctx = gen.context(_prompt(gen))

    n = len(make_sampler(cfg.sampler, gen.schedule, cfg.steps, cfg.eta, cfg.spacing).timesteps)
    total = float(np.median(_time(lambda: gen.generate(context=ctx, config=cfg), repeats, 2))) / n
    c, h, w = gen.bundle.image_shape
    x = np.zeros((1, c, h, w), np.float32)
    c1 = ctx[None].astype(np.float32)
    unet = float(np.median(_time(lambda: gen.eps(x, 1, c1, cfg.guidance), 5 * repeats)))
    return {
        "setting": f"{cfg.sampler}-{n} guidance {cfg.guidance:g}",
        "step_ms": 1e3 * total,
        "unet_ms": 1e3 * unet,
        "overhead_fraction": max(0.0, 1 - unet / total),
    }


# Runs a module as ``python -m`` would, then reports the process's own peak RSS (VmHWM).
# (wait4's ru_maxrss of a child started from this process counts the parent's pages it
# shared between fork and exec: hundreds of MB once torch is loaded here.)
_WRAP = """
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


def _run_measured(module: str, args: list[str], extra: tuple[str, ...] = ()) -> tuple:
    """Wall seconds, peak RSS (bytes) and stderr of ``python -m module args`` as a child."""
    cmd = [sys.executable, *extra, "-c", _WRAP, module, *args]
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


def _cold_start(gen: Generator, default: GenerateConfig, repeats: int, torch_why) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "a.png")
        ours = [
            "--model",
            str(gen.bundle.path),
            "--prompt",
            _prompt(gen),
            "--out",
            out,
            "--force",
            "--no-progress",
        ]
        _run_measured("ddpm_rt.cli", ours)  # a first run fills the optimised-graph cache
        runs = [_run_measured("ddpm_rt.cli", ours) for _ in range(repeats)]
        # torch never imported on this path: ask the interpreter itself
        _, _, log = _run_measured("ddpm_rt.cli", ours, ("-X", "importtime"))
        imported = {ln.split("|")[-1].strip() for ln in log.splitlines() if "|" in ln}
        result = {
            "ddpm_rt": {
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
            _prompt(gen),
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
                _run_measured("ddpm_rt.training.torch_reference", theirs) for _ in range(repeats)
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


def run_bench(
    gen: Generator,
    batch_sizes=(1, 8, 32),
    repeats: int = 30,
    checkpoint: str | None = None,
    sections: tuple[str, ...] = ("unet", "e2e", "overhead", "cold", "text"),
    compile_torch: bool = True,
) -> dict:
    default = GenerateConfig()
    torch_model = (
        _torch_model(gen, checkpoint)
        if {"unet", "e2e", "cold"} & set(sections)
        else (None, None, "not measured")
    )
    peak, peak_why = peak_gflops(gen.backend.threads)
    c, h, w = gen.bundle.image_shape
    one = {
        "x": np.zeros((1, c, h, w), np.float32),
        "t": np.full((1, 1), 0.5, np.float32),
        "c": gen.context(_prompt(gen))[None].astype(np.float32),
    }
    flops, flops_why = unet_flops(gen.bundle.graph_bytes("unet"), one)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "providers": gen.backend.providers,
        "bundle_digest": gen.bundle.digest,
        "prompt": _prompt(gen),
        "peak_gflops": peak if peak else {"skipped": peak_why},
        "unet_flops_per_image_step": flops if flops else {"skipped": flops_why},
        "default": {
            "sampler": default.sampler,
            "steps": len(
                make_sampler(
                    default.sampler, gen.schedule, default.steps, default.eta, default.spacing
                ).timesteps
            ),
            "guidance": default.guidance,
            "unet_precision": gen.unet_precision,
        },
    }
    if "unet" in sections:
        rows = {}
        for precision in gen.bundle.unet_precisions:
            g = (
                gen
                if precision == gen.unet_precision
                else Generator(
                    gen.bundle,
                    providers=gen.backend.providers,
                    unet_precision=precision,
                    threads=gen.backend.threads,
                )
            )
            rows[f"ddpm-rt {precision}"] = _ort_rows(g, batch_sizes, repeats, flops, peak)
        if torch_model[0] is None:
            rows["torch"] = {"skipped": torch_model[2]}
        else:
            rows.update(
                _torch_rows(gen, batch_sizes, repeats, torch_model, compile_torch, flops, peak)
            )
        result["unet_per_step"] = rows
    if "e2e" in sections:
        result["end_to_end_1_image"] = _end_to_end(gen, default, torch_model, max(3, repeats // 10))
    if "overhead" in sections:
        # the default run (per-call setup amortised over its few steps) and the seed's
        # DDPM-500 (the per-step cost alone)
        result["sampler_overhead"] = [
            _overhead(gen, default, max(5, repeats // 3)),
            _overhead(gen, GenerateConfig(sampler="ddpm"), 3),
        ]
    if "cold" in sections:
        result["cold_start"] = _cold_start(gen, default, 3, torch_model[2])
    if "text" in sections and gen.text is not None:
        from .text import tokenize

        ids, mask, _ = tokenize(
            gen.text.tokenizer, "a small red apple on a plain background", gen.text.max_tokens
        )
        text = {}
        for precision, graph in gen.bundle.conditioning["text"]["graphs"].items():
            feeds = {"input_ids": ids, "attention_mask": mask}
            s = _time(lambda graph=graph, feeds=feeds: gen.backend.run(graph, feeds), repeats)
            text[precision] = 1e3 * float(np.median(s))
        result["text_encoder_ms_per_prompt"] = text
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_bench(r: dict) -> str:
    lines = [
        f"machine: {r['cpu']} ({r['cores']} cores), onnxruntime {r['onnxruntime']}, "
        f"providers {','.join(r['providers'])}",
    ]
    peak, flops = r["peak_gflops"], r["unet_flops_per_image_step"]
    lines.append(
        "fp32 peak (ORT MatMul 1024^3): "
        + (f"{peak:.0f} GFLOP/s" if isinstance(peak, float) else f"skipped: {peak['skipped']}")
    )
    lines.append(
        "U-Net FLOPs per image-step: "
        + (
            f"{flops / 1e9:.3f} GFLOP"
            if isinstance(flops, float)
            else f"skipped: {flops['skipped']}"
        )
    )
    d = r["default"]
    lines.append(
        f"defaults: {d['sampler']} {d['steps']} steps, guidance {d['guidance']:g}, "
        f"U-Net {d['unet_precision']}"
    )
    if "unet_per_step" in r:
        lines += ["", "U-Net per step        batch   ms (median)   p90   images/s   of fp32 peak"]
        for name, rows in r["unet_per_step"].items():
            if isinstance(rows, str):
                lines.append(f"{name}: {rows}")
            elif isinstance(rows, dict):
                lines.append(f"{name:<20} skipped: {rows['skipped']}")
            else:
                for row in rows:
                    frac = row.get("fraction_of_peak")
                    lines.append(
                        f"{name:<20} {row['batch']:>5}  {row['ms_per_step']:>12.2f}  "
                        f"{row['p90_ms']:>5.2f}  {row['images_per_s_per_step']:>9.0f}  "
                        + (f"{100 * frac:>6.0f} %" if frac is not None else "")
                    )
    if "end_to_end_1_image" in r:
        lines += ["", "one image, batch 1           seconds   images/s   vs torch course DDPM"]
        for name, row in r["end_to_end_1_image"].items():
            if "skipped" in row:
                lines.append(f"{name:<28} skipped: {row['skipped']}")
                continue
            vs = row.get("vs_torch_course")
            lines.append(
                f"{name:<28} {row['seconds']:>7.3f}  {row['images_per_s']:>9.1f}  "
                + (f"{vs:>8.1f}x" if vs else "")
            )
    for k, o in enumerate(r.get("sampler_overhead", [])):
        lines.append(
            ("\n" if k == 0 else "")
            + f"sampler overhead ({o['setting']}, batch 1): step {o['step_ms']:.3f} ms, U-Net "
            f"{o['unet_ms']:.3f} ms -> {100 * o['overhead_fraction']:.1f} % of a step"
        )
    if "cold_start" in r:
        cs = r["cold_start"]
        ours = cs["ddpm_rt"]
        lines.append(
            f'\ncold start `ddpm-rt --prompt "{r["prompt"]}"` (defaults): {ours["seconds"]:.2f} s, '
            f"peak RSS {ours['peak_rss_mb']:.0f} MB, torch imported: {ours['torch_imported']}"
        )
        ts = cs["torch_script"]
        if "skipped" in ts:
            lines.append(f"torch script: skipped: {ts['skipped']}")
        else:
            lines.append(
                f"torch script, same weights and settings: {ts['seconds']:.2f} s, peak RSS "
                f"{ts['peak_rss_mb']:.0f} MB -> ddpm-rt {cs['speedup']:.1f}x faster"
            )
    for k, v in r.get("text_encoder_ms_per_prompt", {}).items():
        lines.append(f"text encoder {k}: {v:.2f} ms per prompt (10 tokens, uncached)")
    return "\n".join(lines)
