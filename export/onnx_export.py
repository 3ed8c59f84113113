"""``ddpm-rt export CHECKPOINT --out BUNDLE``: U-Net -> ONNX -> parity check -> bundle.

Re-running is idempotent: when the bundle already holds a graph exported from the same
checkpoint weights with the same settings, the graph is reused (and the log says so).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import ddpm_rt
from ddpm_rt.bundle.bundle import MANIFEST, SCHEMA_VERSION, Bundle
from ddpm_rt.bundle.fileio import atomic_write, sha256_file
from ddpm_rt.bundle.io_spec import unet_io
from ddpm_rt.errors import InputError
from ddpm_rt.tolerances import TOLERANCES, check
from ddpm_rt.training.model import ContextUnet, fold_for_export, load_model

from .tracing import ExportConfig, ExportError, trace_to_onnx


def unet_parity_inputs(
    model: ContextUnet, batch: int, conditioning: dict, guidance: dict | None = None, seed: int = 0
):
    """Feeds (x, t, c, and w for a guidance-distilled model, over ``guidance``'s range)."""
    cfg = model.config
    rng = np.random.default_rng(seed + batch)
    x = rng.standard_normal((batch, cfg.in_channels, cfg.height, cfg.width), dtype=np.float32)
    t = rng.uniform(0, 1, (batch, 1)).astype(np.float32)
    if conditioning.get("kind") == "label":
        c = np.eye(cfg.context_dim, dtype=np.float32)[rng.integers(0, cfg.context_dim, batch)]
    else:
        c = rng.standard_normal((batch, cfg.context_dim), dtype=np.float32)
    c[0] = 0.0  # always include a null-context row
    feeds = {"x": x, "t": t, "c": c}
    if cfg.guidance_embedding:
        lo, hi = (guidance["w_min"], guidance["w_max"]) if guidance else (1.0, 4.0)
        feeds["w"] = rng.uniform(lo, hi, (batch, 1)).astype(np.float32)
    return feeds


def check_unet_parity(
    model: ContextUnet,
    onnx_bytes: bytes,
    conditioning: dict,
    batches=(1, 8),
    guidance: dict | None = None,
) -> list[dict]:
    """Torch vs ONNX Runtime (CPU, fp32) on the same inputs; raises ExportError on a miss."""
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    report = []
    for b in batches:
        feeds = unet_parity_inputs(model, b, conditioning, guidance)
        with torch.no_grad():
            ref = model(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        got = sess.run(["eps"], feeds)[0]
        ok, _ = check("ort", "fp32", got, ref)
        report.append({"batch": b, "max_abs_err": float(np.abs(got - ref).max()), "ok": ok})
        if not ok:
            raise ExportError(
                f"ONNX Runtime output differs from torch at batch {b} "
                f"(max abs error {np.abs(got - ref).max():.3g}, "
                f"tolerance {TOLERANCES[('ort', 'fp32')]})"
            )
    return report


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def export_bundle(cfg: ExportConfig, log: Callable[[str], None] = print) -> Path:
    ckpt = Path(cfg.checkpoint)
    model, meta = load_model(ckpt)
    latent_info = meta.get("latent")
    decoder = None
    if latent_info:  # the autoencoder is found and checked before anything is written
        from .decoder_export import add_decoder, decoder_for_bundle

        decoder = decoder_for_bundle(cfg, latent_info)
    elif cfg.autoencoder is not None:
        raise InputError(f"{ckpt} is a pixel U-Net: --autoencoder applies to latent models only")
    ckpt_sha = sha256_file(ckpt / "model.safetensors")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a folder, got a file: {out}")
    out.mkdir(parents=True, exist_ok=True)
    u = model.config
    spec = unet_io(u.in_channels, u.height, u.width, u.context_dim, u.guidance_embedding)
    source = {"checkpoint_sha256": ckpt_sha, "step": meta.get("step"), "opset": cfg.opset}
    if decoder is not None:
        source["autoencoder_sha256"] = decoder.sha256
    if out.resolve() == ckpt.resolve():
        raise InputError("--out must differ from the checkpoint folder")

    old = _read_manifest(out)
    unet_path = out / spec.file
    reuse = (
        not cfg.force
        and old is not None
        and old.get("source") == source
        and unet_path.is_file()
        and old["files"].get(spec.file, {}).get("sha256") == sha256_file(unet_path)
    )
    if reuse:
        log(f"reusing {unet_path} (exported from the same checkpoint weights)")
        parity = old.get("parity", {}).get("unet")
    else:
        guidance = meta.get("guidance")
        feeds = unet_parity_inputs(model, 2, meta["conditioning"], guidance)
        example = tuple(torch.from_numpy(v) for v in feeds.values())
        onnx_bytes = trace_to_onnx(fold_for_export(model), example, spec, cfg.opset)
        parity = check_unet_parity(
            model, onnx_bytes, meta["conditioning"], cfg.parity_batches, guidance
        )
        for p in parity:
            log(f"parity unet batch {p['batch']}: max |onnx - torch| = {p['max_abs_err']:.2e} (ok)")
        atomic_write(unet_path, lambda f: f.write(onnx_bytes))
        log(f"wrote {unet_path} ({len(onnx_bytes) / 1e6:.1f} MB)")

    graphs = {spec.name: spec.to_dict()}
    files = {spec.file: {"sha256": sha256_file(unet_path), "bytes": unet_path.stat().st_size}}
    conditioning = meta["conditioning"]
    if conditioning.get("kind") == "text":
        conditioning = _add_text_encoder(cfg, conditioning, out, graphs, files, log)
    image = {"channels": u.in_channels, "height": u.height, "width": u.width}
    extra: dict = {}
    if decoder is not None:
        size = int(latent_info["image_size"])
        image = {"channels": 3, "height": size, "width": size}
        reused = old is not None and old.get("source") == source and not cfg.force
        latent, dparity = add_decoder(cfg, decoder, out, graphs, files, reused, old, log)
        extra = {"requires": ["latent"], "latent": latent}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        **extra,
        "image": image,
        "schedule": meta["schedule"],
        "conditioning": conditioning,
        "graphs": graphs,
        "files": files,
        "producer": {
            "ddpm_rt": ddpm_rt.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "opset": cfg.opset,
            "python": platform.python_version(),
        },
        "source": source,
        "model": {
            "unet": u.to_dict(),
            "export": {
                k: v for k, v in asdict(cfg).items() if k not in ("checkpoint", "out", "force")
            },
        },
        "parity": {"unet": parity},
    }
    if decoder is not None:
        manifest["parity"]["decoder"] = dparity
    _add_distilled(manifest, meta)
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as read back
    if old == manifest:
        log(f"{out / MANIFEST} is up to date")
    else:
        _write_json(out / MANIFEST, manifest)
        log(f"wrote {out / MANIFEST}")
    Bundle.load(out)  # the runtime's own validation, as a final check
    return out


# The guidance the teacher recommends (its model card); a student recommends it too when
# it was distilled for it, else the nearest scale it was.
TEACHER_GUIDANCE = 2.0


def distilled_facts(meta: dict) -> tuple[dict, dict] | None:
    """(``distilled``, ``recommended``) for a distilled checkpoint's config, None for an
    ordinary one."""
    guidance = meta.get("guidance")
    timesteps = meta.get("distilled_steps")
    if not guidance and not timesteps:
        return None
    distilled: dict = {"prediction": meta.get("prediction", "eps")}
    recommended: dict = {}
    if guidance:
        lo, hi = float(guidance["w_min"]), float(guidance["w_max"])
        distilled["guidance"] = {"w_min": lo, "w_max": hi}
        recommended["guidance"] = min(max(TEACHER_GUIDANCE, lo), hi)
    if timesteps:
        how = meta.get("distilled_sampler") or {}
        sampler = {
            "sampler": how.get("sampler", "ddim"),
            "eta": float(how.get("eta", 0.0)),
            "spacing": how.get("spacing", "time"),
        }
        distilled["steps"] = {**sampler, "timesteps": [int(t) for t in timesteps]}
        recommended.update(sampler=sampler["sampler"], steps=len(timesteps), eta=sampler["eta"])
        if sampler["spacing"] != "time":
            recommended["spacing"] = sampler["spacing"]
    return distilled, recommended


def _add_distilled(manifest: dict, meta: dict) -> None:
    """A distilled checkpoint's bundle: its U-Net is described as such (what it was distilled
    for, its recommended settings), and a graph that takes w is a feature it requires."""
    facts = distilled_facts(meta)
    if facts is None:
        return
    distilled, recommended = facts
    manifest["unet_precisions"] = {
        "fp32": {"graph": "unet", "distilled": distilled, "recommended": recommended}
    }
    manifest["recommended"] = dict(recommended)
    if "guidance" in distilled:
        from ddpm_rt.bundle.manifest import GUIDANCE_DISTILLED

        manifest["requires"] = [*manifest.get("requires", []), GUIDANCE_DISTILLED]


TEXT_GRAPH = {"fp32": "text_encoder", "int8": "text_encoder_int8"}


def _add_text_encoder(
    cfg: ExportConfig, cond: dict, out: Path, graphs: dict, files: dict, log
) -> dict:
    """Copy the text encoder the model was trained with into the bundle."""
    from ddpm_rt.text import PRECISIONS, read_text_folder

    src = Path(cfg.text_encoder or cond["text_encoder"]["path"])
    tmeta = read_text_folder(src)
    fp32 = tmeta["graphs"]["fp32"]["file"]
    if tmeta["files"][fp32]["sha256"] != cond["text_encoder"]["sha256"]:
        raise ExportError(
            f"text encoder in {src} is not the one this model was trained with "
            "(sha256 differs); pass --text-encoder with the right folder"
        )
    if tmeta["embedding_dim"] != cond["context_dim"]:
        raise ExportError("text encoder dimension differs from the model's context dimension")
    precisions = list(dict.fromkeys(cfg.text_precisions))
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise InputError(f"text precisions must be from {', '.join(PRECISIONS)}")
    wanted = [tmeta["tokenizer"]] + [tmeta["graphs"][p]["file"] for p in precisions]
    for name in wanted:
        dst = out / name
        sha = tmeta["files"][name]["sha256"]
        if dst.is_file() and sha256_file(dst) == sha:
            log(f"reusing {dst}")
        else:
            data = (src / name).read_bytes()
            atomic_write(dst, lambda f, data=data: f.write(data))
            log(f"wrote {dst}")
        files[name] = dict(tmeta["files"][name])
    for p in precisions:
        graphs[TEXT_GRAPH[p]] = {k: v for k, v in tmeta["graphs"][p].items()}
    default = (
        tmeta["default_precision"] if tmeta["default_precision"] in precisions else precisions[0]
    )
    text = {
        k: tmeta[k]
        for k in ("max_tokens", "embedding_dim", "pooling", "normalize", "checks", "source")
        if k in tmeta
    }
    text.update(
        tokenizer=tmeta["tokenizer"],
        default_precision=default,
        graphs={p: TEXT_GRAPH[p] for p in precisions},
    )
    return {"kind": "text", "context_dim": cond["context_dim"], "text": text}


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
