"""Strict, typed validation of a bundle's ``manifest.json`` (schema version 1).

A bundle is untrusted input, so every field the runtime reads is checked for type and range
before anything else happens, and a failure is one line naming the field
(``conditioning.context_dim: must be an integer in [1, 8192], got 1e9``).

Versioning: ``schema_version`` is an integer >= 1 that changes only for incompatible
changes. Fields this runtime does not know are ignored, so new optional fields can land
without breaking older runtimes. A manifest lists in ``requires`` the features a runtime
must understand to use it (say a precision variant or a new sampler input); a runtime
refuses a bundle that requires a feature it lacks, naming it. Bundles written before
``requires`` existed (schema 1, no ``requires``) load unchanged.

The limits below bound what a manifest can make the runtime allocate or read; each is far
above anything this project trains (16x16 images, 500 timesteps, 384-d contexts).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from ddpm_rt.bundle.io_spec import ORT_TYPES, GraphIO, decoder_io, text_encoder_io, unet_io
from ddpm_rt.core.samplers import SAMPLERS, SPACINGS
from ddpm_rt.errors import BundleError

SCHEMA_VERSION = 1
# Features this runtime understands, for a manifest's ``requires`` list. ``latent``: the
# U-Net samples a latent that a decoder graph turns into the image (``latent`` object).
# ``guidance-distilled``: a U-Net graph takes the guidance scale as a 4th input ``w`` and makes
# no unconditional pass (``unet_precisions.<p>.distilled.guidance``, issue 29).
GUIDANCE_DISTILLED = "guidance-distilled"
KNOWN_FEATURES: frozenset[str] = frozenset({"latent", GUIDANCE_DISTILLED})

MAX_TIMESTEPS = 10_000
MAX_IMAGE_SIDE = 1024
MAX_CONTEXT_DIM = 8192
MAX_TOKENS = 8192
MAX_LABELS = 100_000
MAX_GRAPHS = 32
MAX_FILES = 64
# A single ONNX protobuf cannot exceed 2 GiB; bundles may not use external data.
MAX_FILE_BYTES = 2**31 - 1
MAX_MANIFEST_BYTES = 4 * 2**20
MAX_GUIDANCE = 50.0  # beyond this guided noise leaves the model's range (and is useless)

# A plain file name: no folders, no leading dot, nothing a shell or a filesystem treats
# specially. Checked before any file named by the manifest is opened.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_GRAPH_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
CONDITIONING_KINDS = ("label", "text", "vector")
# A distilled U-Net (issue 29) ships beside the teacher as a precision-like variant family.
UNET_PRECISIONS = (
    "fp32",
    "fp16",
    "int8",
    "int8-qdq",
    "distilled",
    "distilled-fp16",
    "distilled-int8",
    "distilled-int8-qdq",
)
DECODER_PRECISIONS = ("fp32", "fp16", "int8")
# ``latent.kind``: "learned" (an autoencoder's latent space; the default when absent) or
# "pixels" (a cascade: the latent is the base model's RGB picture at a whole fraction of
# the image's size, in [-1, 1], scale 1, shift 0; the decoder is a super-resolution
# network, and a caller may take the small picture without decoding).
LATENT_KINDS = ("learned", "pixels")
MAX_LATENT_CHANNELS = 64
MAX_SCALE_FACTOR = 1e6


class _Fail(Exception):
    pass


def _fail(path: str, why: str):
    raise _Fail(f"{path}: {why}")


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _get(obj: dict, path: str, key: str, required: bool = True) -> Any:
    if key not in obj:
        if required:
            _fail(f"{path}.{key}".lstrip("."), "missing")
        return None
    return obj[key]


def _dict(obj: dict, path: str, key: str, required: bool = True) -> dict | None:
    v = _get(obj, path, key, required)
    if (required or v is not None) and not isinstance(v, dict):
        _fail(f"{path}.{key}".lstrip("."), f"must be an object, got {_show(v)}")
    return v


def _int(obj: dict, path: str, key: str, lo: int, hi: int) -> int:
    v = _get(obj, path, key)
    if type(v) is not int or not lo <= v <= hi:  # bool is not an int here
        _fail(f"{path}.{key}".lstrip("."), f"must be an integer in [{lo}, {hi}], got {_show(v)}")
    return v


def _float(obj: dict, path: str, key: str, lo: float, hi: float, closed: bool = False) -> float:
    v = _get(obj, path, key)
    ok = type(v) in (int, float) and math.isfinite(v)
    ok = ok and (lo <= v <= hi if closed else lo < v < hi)
    if not ok:
        span = f"[{lo}, {hi}]" if closed else f"({lo}, {hi})"
        _fail(f"{path}.{key}".lstrip("."), f"must be a number in {span}, got {_show(v)}")
    return float(v)


def _str(obj: dict, path: str, key: str, pattern: re.Pattern | None = None, choices=None) -> str:
    v = _get(obj, path, key)
    where = f"{path}.{key}".lstrip(".")
    if not isinstance(v, str):
        _fail(where, f"must be a string, got {_show(v)}")
    if pattern is not None and not pattern.fullmatch(v):
        _fail(where, f"{_show(v)} is not allowed")
    if choices is not None and v not in choices:
        _fail(where, f"must be one of {', '.join(choices)}, got {_show(v)}")
    return v


def check_file_name(name: Any, where: str) -> str:
    """A manifest path must be a plain file name inside the bundle (no folders, no ``..``)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        _fail(where, f"{_show(name)} is not a plain file name inside the bundle")
    return name


def _tensor(t: Any, where: str) -> dict:
    if not isinstance(t, dict):
        _fail(where, f"must be an object, got {_show(t)}")
    _str(t, where, "name", _GRAPH_NAME)
    _str(t, where, "dtype", choices=tuple(ORT_TYPES))
    shape = _get(t, where, "shape")
    ok = isinstance(shape, list) and 1 <= len(shape) <= 8
    for d in shape if ok else ():
        ok = ok and (
            (type(d) is int and 1 <= d <= 2**20)
            or (isinstance(d, str) and bool(_GRAPH_NAME.fullmatch(d)))
        )
    if not ok:
        _fail(
            f"{where}.shape",
            f"must be a list of 1-8 dimensions (int >= 1 or axis name), got {_show(shape)}",
        )
    return t


def _graph(name: str, g: Any, files: dict) -> GraphIO:
    where = f"graphs.{name}"
    if not _GRAPH_NAME.fullmatch(name):
        _fail("graphs", f"graph name {_show(name)} is not allowed")
    if not isinstance(g, dict):
        _fail(where, f"must be an object, got {_show(g)}")
    file = check_file_name(_get(g, where, "file"), f"{where}.file")
    if file not in files:
        _fail(f"{where}.file", f"{file} is not listed under 'files'")
    for kind in ("inputs", "outputs"):
        ts = _get(g, where, kind)
        if not isinstance(ts, list) or not 1 <= len(ts) <= 16:
            _fail(f"{where}.{kind}", f"must be a list of 1-16 tensors, got {_show(ts)}")
        for i, t in enumerate(ts):
            _tensor(t, f"{where}.{kind}[{i}]")
    return GraphIO.from_dict(name, g)


def _expect_graph(expected: GraphIO, actual: GraphIO, why: str) -> None:
    mismatch = expected.mismatch(actual)
    if mismatch:
        _fail(f"graphs.{actual.name}", f"{mismatch} ({why})")


def validate_manifest(m: Any) -> None:
    """Raise :class:`BundleError` naming the first bad field; return None when valid."""
    try:
        _validate(m)
    except _Fail as e:
        raise BundleError(f"invalid manifest: {e}") from None


def _validate(m: Any) -> None:
    """One section after another, in this order: the first bad field is the one reported."""
    requires = _version_and_requires(m)
    files = _files(m)
    c, h, w = _image(m)
    latent = _latent_presence(m, requires)
    sample = (c, h, w) if latent is None else _latent(latent, h, w)  # what the U-Net samples
    timesteps = _schedule(m)
    graphs = _graphs(m, files)
    precisions = _unet_precisions(m, graphs, timesteps)
    w_graphs = _guidance_inputs(m, precisions, requires)
    _recommended(m.get("recommended"), "recommended", timesteps)
    cond = _dict(m, "", "conditioning")
    kind = _str(cond, "conditioning", "kind", choices=CONDITIONING_KINDS)
    d = _int(cond, "conditioning", "context_dim", 1, MAX_CONTEXT_DIM)
    for gname in {"unet", *(e["graph"] for e in precisions.values())}:
        _expect_graph(
            unet_io(*sample, d, guidance_input=gname in w_graphs),
            graphs[gname],
            f"must agree with {'latent' if latent is not None else 'image'} and conditioning",
        )
    if latent is not None:
        _latent_decoder(latent, graphs, sample, h, w)
    if kind == "label":
        _label_names(cond, d)
    if kind == "text":
        _text(cond, d, files, graphs)


def _version_and_requires(m: Any) -> list:
    """``schema_version`` and ``requires``: a newer bundle, or one that needs a feature this
    runtime lacks, is refused with advice to upgrade. Returns ``requires``."""
    if not isinstance(m, dict):
        _fail("manifest", "must be a JSON object")
    version = _get(m, "", "schema_version")
    if type(version) is not int or version < 1:
        _fail("schema_version", f"must be an integer >= 1, got {_show(version)}")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"bundle has schema version {version}, newer than this ddpm-rt reads "
            f"({SCHEMA_VERSION}); upgrade ddpm-rt"
        )
    requires = m.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        _fail("requires", f"must be a list of feature names, got {_show(requires)}")
    missing = [r for r in requires if r not in KNOWN_FEATURES]
    if missing:
        raise BundleError(
            f"bundle requires feature(s) this ddpm-rt does not have: {', '.join(missing)}; "
            "upgrade ddpm-rt"
        )
    return requires


def _files(m: dict) -> dict:
    """``files``: plain names, each with its sha256 and size."""
    files = _dict(m, "", "files")
    if not 1 <= len(files) <= MAX_FILES:
        _fail("files", f"must list 1-{MAX_FILES} files, got {len(files)}")
    for name, meta in files.items():
        check_file_name(name, "files")
        where = f"files.{name}"
        if not isinstance(meta, dict):
            _fail(where, f"must be an object, got {_show(meta)}")
        _str(meta, where, "sha256", _SHA256)
        _int(meta, where, "bytes", 1, MAX_FILE_BYTES)
    return files


def _image(m: dict) -> tuple[int, int, int]:
    """``image``: the RGB picture the runtime writes, (channels, height, width)."""
    image = _dict(m, "", "image")
    c = _int(image, "image", "channels", 3, 3)  # the runtime writes RGB
    h = _int(image, "image", "height", 4, MAX_IMAGE_SIDE)
    w = _int(image, "image", "width", 4, MAX_IMAGE_SIDE)
    if h % 4 or w % 4:
        _fail("image", f"height and width must be divisible by 4, got {h}x{w}")
    return c, h, w


def _latent_presence(m: dict, requires: list) -> dict | None:
    """The optional ``latent`` object, present exactly when ``requires`` lists 'latent'."""
    latent = _dict(m, "", "latent", required=False)
    if latent is not None and "latent" not in requires:
        _fail(
            "requires",
            "a bundle with a 'latent' object must list 'latent' (older runtimes "
            "would otherwise draw its latents as pixels)",
        )
    if "latent" in requires and latent is None:
        _fail("latent", "missing (the bundle requires 'latent')")
    return latent


def _latent(latent: dict, h: int, w: int) -> tuple[int, int, int]:
    """``latent``'s shape, scale and shift (its decoder is checked once the graphs are
    known: :func:`_latent_decoder`). Returns the latent's (channels, height, width)."""
    lc = _int(latent, "latent", "channels", 1, MAX_LATENT_CHANNELS)
    lh = _int(latent, "latent", "height", 4, h)
    lw = _int(latent, "latent", "width", 4, w)
    if lh % 4 or lw % 4:
        _fail("latent", f"height and width must be divisible by 4, got {lh}x{lw}")
    if h % lh or w % lw or h // lh != w // lw:
        _fail("latent", f"{lh}x{lw} must divide the image {h}x{w} by one whole factor")
    _float(latent, "latent", "scale_factor", 0.0, MAX_SCALE_FACTOR)
    shift = latent.get("shift")
    if shift is not None and not (
        isinstance(shift, list)
        and len(shift) == lc
        and all(type(v) in (int, float) and math.isfinite(v) for v in shift)
    ):
        _fail("latent.shift", f"must be a list of {lc} finite numbers, got {_show(shift)}")
    if "kind" in latent and _str(latent, "latent", "kind", choices=LATENT_KINDS) == "pixels":
        if lc != 3:
            _fail("latent", f"a 'pixels' latent is an RGB picture: 3 channels, got {lc}")
        if latent["scale_factor"] != 1 or any(v != 0 for v in (shift or [])):
            _fail("latent", "a 'pixels' latent has scale_factor 1 and shift 0 (it is the picture)")
    return lc, lh, lw


def _schedule(m: dict) -> int:
    """``schedule``: a linear beta schedule. Returns its number of timesteps."""
    sched = _dict(m, "", "schedule")
    _str(sched, "schedule", "kind", choices=("linear",))
    _int(sched, "schedule", "timesteps", 1, MAX_TIMESTEPS)
    b0 = _float(sched, "schedule", "beta_start", 0.0, 1.0)
    b1 = _float(sched, "schedule", "beta_end", 0.0, 1.0)
    if b0 > b1:
        _fail("schedule", f"beta_start {b0} must not exceed beta_end {b1}")
    return int(sched["timesteps"])


def _graphs(m: dict, files: dict) -> dict[str, GraphIO]:
    """``graphs``: each one's file and tensors; a 'unet' among them."""
    graphs_raw = _dict(m, "", "graphs")
    if not 1 <= len(graphs_raw) <= MAX_GRAPHS:
        _fail("graphs", f"must hold 1-{MAX_GRAPHS} graphs, got {len(graphs_raw)}")
    graphs = {name: _graph(name, g, files) for name, g in graphs_raw.items()}
    if "unet" not in graphs:
        _fail("graphs", "no 'unet' graph")
    return graphs


def _unet_precisions(m: dict, graphs: dict, timesteps: int) -> dict:
    """The optional ``unet_precisions``: a known precision -> a graph of the bundle, and for
    a distilled U-Net what it was distilled for (:func:`_distilled`) and its own
    ``recommended`` settings."""
    precisions = _dict(m, "", "unet_precisions", required=False) or {}
    for precision, entry in precisions.items():
        where = f"unet_precisions.{precision}"
        if precision not in UNET_PRECISIONS:
            _fail(
                "unet_precisions", f"{_show(precision)} is not one of {', '.join(UNET_PRECISIONS)}"
            )
        if not isinstance(entry, dict):
            _fail(where, f"must be an object, got {_show(entry)}")
        gname = _str(entry, where, "graph", _GRAPH_NAME)
        if gname not in graphs:
            _fail(f"{where}.graph", f"{gname} is not a graph of this bundle")
        if entry.get("distilled") is not None:
            _distilled(_dict(entry, where, "distilled"), f"{where}.distilled", timesteps)
        _recommended(entry.get("recommended"), f"{where}.recommended", timesteps)
    return precisions


def _distilled(dist: dict, where: str, timesteps: int) -> None:
    """A distilled U-Net's ``distilled`` object. ``guidance`` ({w_min, w_max}): the graph
    takes w and its output is the guided eps for w in that range; ``steps`` ({sampler, eta,
    spacing, timesteps}): the deterministic steps it was distilled to take (absent: any
    sampler); ``prediction``: what the network predicted inside (its graph outputs eps)."""
    guidance = _dict(dist, where, "guidance", required=False)
    if guidance is not None:
        lo = _float(guidance, f"{where}.guidance", "w_min", 0.0, MAX_GUIDANCE, closed=True)
        hi = _float(guidance, f"{where}.guidance", "w_max", 0.0, MAX_GUIDANCE, closed=True)
        if lo > hi:
            _fail(f"{where}.guidance", f"w_min {lo} must not exceed w_max {hi}")
    steps = _dict(dist, where, "steps", required=False)
    if steps is not None:
        sw = f"{where}.steps"
        _str(steps, sw, "sampler", choices=("ddim",))
        _float(steps, sw, "eta", 0.0, 1.0, closed=True)
        _str(steps, sw, "spacing", choices=SPACINGS)
        ts = _get(steps, sw, "timesteps")
        ok = isinstance(ts, list) and 1 <= len(ts) <= timesteps
        ok = ok and all(type(v) is int and 1 <= v <= timesteps for v in ts)
        if not ok or any(a <= b for a, b in itertools.pairwise(ts)):
            _fail(
                f"{sw}.timesteps",
                f"must be 1-{timesteps} decreasing integers in [1, {timesteps}], got {_show(ts)}",
            )
    if dist.get("prediction") is not None:
        _str(dist, where, "prediction", choices=("eps", "v"))


def takes_w(entry: dict) -> bool:
    """Whether a ``unet_precisions`` entry's graph is guidance-distilled (takes ``w``)."""
    return bool((entry.get("distilled") or {}).get("guidance"))


def _guidance_inputs(m: dict, precisions: dict, requires: list) -> set[str]:
    """The U-Net graphs that take w (a guidance-distilled entry's); ``requires`` lists
    ``guidance-distilled`` exactly when there is one, and no graph is both."""
    w_graphs = {e["graph"] for e in precisions.values() if takes_w(e)}
    plain = {e["graph"] for e in precisions.values() if not takes_w(e)}
    if "fp32" not in precisions:
        plain.add("unet")  # the fp32 U-Net, an ordinary one unless its entry says otherwise
    both = w_graphs & plain
    if both:
        _fail(
            "unet_precisions",
            f"graph {sorted(both)[0]} is listed both as guidance-distilled and not",
        )
    if w_graphs and GUIDANCE_DISTILLED not in requires:
        _fail("requires", f"must list {GUIDANCE_DISTILLED!r}: graph {sorted(w_graphs)[0]} takes w")
    if GUIDANCE_DISTILLED in requires and not w_graphs:
        _fail("requires", f"lists {GUIDANCE_DISTILLED!r} but no U-Net graph takes w")
    return w_graphs


def _latent_decoder(latent: dict, graphs: dict, sample: tuple, h: int, w: int) -> None:
    """``latent.decoder``: a graph per known precision, latent -> image, and its default."""
    dec = _dict(latent, "latent", "decoder")
    dgraphs = _dict(dec, "latent.decoder", "graphs")
    if not dgraphs:
        _fail("latent.decoder.graphs", "must name at least one decoder graph")
    for precision, gname in dgraphs.items():
        where = f"latent.decoder.graphs.{precision}"
        if precision not in DECODER_PRECISIONS:
            _fail(
                "latent.decoder.graphs",
                f"{_show(precision)} is not one of {', '.join(DECODER_PRECISIONS)}",
            )
        if not isinstance(gname, str) or gname not in graphs:
            _fail(where, f"{_show(gname)} is not a graph of this bundle")
        _expect_graph(decoder_io(*sample, h, w), graphs[gname], "the latent decoder")
    _str(dec, "latent.decoder", "default_precision", choices=tuple(dgraphs))


def _label_names(cond: dict, d: int) -> None:
    """A label model's optional ``conditioning.label_names``: at most one per context dim."""
    names = _get(cond, "conditioning", "label_names", required=False) or []
    ok = isinstance(names, list) and len(names) <= min(d, MAX_LABELS)
    if not ok or not all(isinstance(n, str) and n.strip() for n in names):
        _fail(
            "conditioning.label_names",
            f"must be a list of at most context_dim ({d}) non-empty strings",
        )


def _text(cond: dict, d: int, files: dict, graphs: dict) -> None:
    """A text model's ``conditioning.text``: tokenizer, token limit, encoder graphs."""
    text = _dict(cond, "conditioning", "text")
    _int(text, "conditioning.text", "max_tokens", 2, MAX_TOKENS)
    tok = check_file_name(
        _get(text, "conditioning.text", "tokenizer"), "conditioning.text.tokenizer"
    )
    if tok not in files:
        _fail("conditioning.text.tokenizer", f"{tok} is not listed under 'files'")
    if "embedding_dim" in text and text["embedding_dim"] != d:
        _fail("conditioning.text.embedding_dim", f"must equal context_dim ({d})")
    tgraphs = _dict(text, "conditioning.text", "graphs")
    if not tgraphs:
        _fail("conditioning.text.graphs", "must name at least one text-encoder graph")
    for precision, gname in tgraphs.items():
        where = f"conditioning.text.graphs.{precision}"
        if not isinstance(gname, str) or gname not in graphs:
            _fail(where, f"{_show(gname)} is not a graph of this bundle")
        _expect_graph(text_encoder_io(d), graphs[gname], "a text encoder")
    _str(text, "conditioning.text", "default_precision", choices=tuple(tgraphs))


RECOMMENDED_KEYS = ("sampler", "steps", "eta", "guidance", "spacing")


def _recommended(rec: Any, where: str, timesteps: int) -> None:
    """An optional ``recommended`` object (the manifest's, or a distilled U-Net's own): the
    model's default settings (written by ``ddpm-rt eval --write-recommended``); each key
    optional, each checked as the runtime would check the same setting given by a caller."""
    if rec is None:
        return
    if not isinstance(rec, dict):
        _fail(where, f"must be an object, got {_show(rec)}")
    for key in rec:
        if key not in RECOMMENDED_KEYS:
            _fail(
                where,
                f"unknown setting {_show(key)} (known: {', '.join(RECOMMENDED_KEYS)})",
            )
    sampler = rec.get("sampler")
    if sampler is not None:
        _str(rec, where, "sampler", choices=SAMPLERS)
    if rec.get("steps") is not None:
        steps = _int(rec, where, "steps", 1, timesteps)
        if sampler == "ddpm" and steps != timesteps:
            _fail(f"{where}.steps", f"ddpm runs all {timesteps} steps, got {steps}")
    if rec.get("eta") is not None:
        _float(rec, where, "eta", 0.0, 1.0, closed=True)
        if sampler != "ddim":
            _fail(f"{where}.eta", "applies to ddim only")
    if rec.get("guidance") is not None:
        _float(rec, where, "guidance", 0.0, MAX_GUIDANCE, closed=True)
    if rec.get("spacing") is not None:
        _str(rec, where, "spacing", choices=SPACINGS)
        if sampler in (None, "ddpm"):
            _fail(f"{where}.spacing", "applies to a named few-step sampler only")
    if sampler is None and any(rec.get(k) is not None for k in ("steps", "eta")):
        _fail(where, "steps and eta need the sampler they are for")
