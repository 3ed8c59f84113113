"""Training data: uint8 images (N, H, W, 3), each with one or more conditioning choices.

Conditioning is stored as a table of context vectors ``table`` (U, D) and, per image, the
rows it may use (``choices`` (N, K), -1 padded): an image with several captions gets one
picked at random each step. Accepted inputs (a file that does not fit gets a one-line
:class:`InputError`):

* ``.npz`` with ``images`` and ``labels`` ((N,) integers or (N, K) one-/multi-hot) plus
  optional ``label_names``, or ``contexts`` ((N, D) float vectors), and optional
  ``captions`` ((N,) strings);
* ``.npy`` images plus a separate ``.npy`` of labels or contexts -- the course's format
  (sprites ``(N, 16, 16, 3)`` uint8 + one-hot labels ``(N, 5)``) loads as is;
* a *latent* ``.npz`` from ``ddpm-rt encode-latents``: ``latents`` (N, C, h, w) float32
  (already multiplied by the autoencoder's scale factor) in place of ``images``, with the
  same labels/captions and ``latent`` (JSON: scale factor, shape, autoencoder); the U-Net
  then trains on the latents (``Dataset.latent`` is that JSON, decoded);
* a folder in the Hugging Face *imagefolder* layout: images plus ``metadata.jsonl`` lines
  ``{"file_name": "x.png", "text": "a caption"}`` (``text`` may be a list; a file may
  appear on several lines).

With a text encoder, captions (or, for label-only data, the label names) are embedded once
per unique caption; without one, labels become one-hot (or the given multi-hot) vectors,
as in the course.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddpm_rt.errors import InputError


@dataclass
class Dataset:
    images: np.ndarray  # (N, H, W, 3) uint8 pixels, or (N, C, h, w) float32 latents
    table: np.ndarray  # (U, D) float32 context vectors
    choices: np.ndarray  # (N, K) int64 rows of `table` per image, -1 padded
    label_names: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # aligned with `table` for text data
    text_encoder: dict | None = None  # {"path", "sha256"} of the encoder that made `table`
    latent: dict | None = None  # latent data: scale factor, shape, autoencoder (encode-latents)

    @property
    def conditioning(self) -> dict:
        if self.text_encoder is not None:
            return {
                "kind": "text",
                "context_dim": self.context_dim,
                "text_encoder": self.text_encoder,
            }
        if self.label_names:
            return {
                "kind": "label",
                "context_dim": self.context_dim,
                "label_names": list(self.label_names),
            }
        return {"kind": "vector", "context_dim": self.context_dim}

    @property
    def context_dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of what the U-Net sees: the pixels, or the latents."""
        if self.latent is not None:
            return int(self.images.shape[2]), int(self.images.shape[3])
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1]) if self.latent is not None else 3

    @property
    def num_choices(self) -> np.ndarray:
        return (self.choices >= 0).sum(1)

    @property
    def contexts(self) -> np.ndarray:
        """(N, D): each image's first context."""
        return self.table[self.choices[:, 0]]

    def sample_contexts(self, rows: int) -> tuple[np.ndarray, list[str]]:
        """Up to ``rows`` distinct contexts for preview grids, with their names."""
        if self.captions:
            names = self.captions[:rows]
            return self.table[: len(names)], names
        if self.label_names:
            k = min(rows, len(self.label_names))
            return np.eye(self.context_dim, dtype=np.float32)[:k], self.label_names[:k]
        return self.contexts[:rows], [f"#{i}" for i in range(min(rows, len(self.images)))]

    def __len__(self) -> int:
        return len(self.images)


def _load_array(path: Path, what: str) -> np.ndarray | dict:
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"cannot read {what} file {path}: {e}") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            return {k: data[k] for k in data.files}
    return data


def _labels(labels: np.ndarray, n: int, names: list[str] | None):
    """-> (table, choices, names) for integer or one-/multi-hot labels."""
    if labels.shape[0] != n:
        raise InputError(f"{labels.shape[0]} labels for {n} images")
    if labels.ndim == 1:
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"1-D labels must be integers, got {labels.dtype}")
        if labels.min() < 0:
            raise InputError("labels must be >= 0")
        k = int(labels.max()) + 1 if names is None else len(names)
        if labels.max() >= k:
            raise InputError(f"label {int(labels.max())} has no name ({k} label names given)")
        table, choices = np.eye(k, dtype=np.float32), labels.astype(np.int64)[:, None]
    elif labels.ndim == 2:
        k = labels.shape[1]
        table, choices = labels.astype(np.float32), np.arange(n, dtype=np.int64)[:, None]
    else:
        raise InputError(f"labels must be (N,) or (N, K), got shape {labels.shape}")
    names = [str(i) for i in range(k)] if names is None else [str(s) for s in names]
    if len(names) != k:
        raise InputError(f"{len(names)} label names for {k} labels")
    if len(set(names)) != len(names):
        raise InputError("label names must be unique")
    return table, choices, names


def parse_label_names(value: str | None) -> list[str] | None:
    """``a,b,c`` or a text file with one name per line."""
    if value is None:
        return None
    p = Path(value)
    if p.is_file():
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return [s.strip() for s in value.split(",") if s.strip()]


def read_captions_file(path: str | Path, n: int) -> list[list[str]]:
    """A caption per image: .txt (one per line) or .json (list of strings or lists)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"captions file not found: {path}")
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"cannot read captions {path}: {e}") from None
    else:
        raw = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not isinstance(raw, list) or len(raw) != n:
        raise InputError(f"{path}: need a list of {n} captions (one per image)")
    return [_caption_list(c, f"{path} entry {i}") for i, c in enumerate(raw)]


def _caption_list(c, where: str) -> list[str]:
    out = [c] if isinstance(c, str) else c
    if (
        not isinstance(out, list)
        or not out
        or not all(isinstance(s, str) and s.strip() for s in out)
    ):
        raise InputError(f"{where}: a caption must be a non-empty string or list of strings")
    return [" ".join(s.split()) for s in out]


def load_imagefolder(folder: Path, size: int | None = None) -> tuple[np.ndarray, list[list[str]]]:
    """Hugging Face imagefolder: images + metadata.jsonl with file_name and text."""
    from PIL import Image

    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise InputError(f"{folder} has no metadata.jsonl (imagefolder layout)")
    caps: dict[str, list[str]] = {}
    for ln, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{meta}:{ln}: need a JSON object with file_name and text") from None
        caps.setdefault(name, []).extend(_caption_list(text, f"{meta}:{ln}"))
    if not caps:
        raise InputError(f"{meta} lists no images")
    images = []
    for name in caps:
        p = folder / name
        try:
            with Image.open(p) as im:
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im).convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BOX)
                images.append(np.asarray(im))
        except OSError as e:
            raise InputError(f"cannot read image {p}: {e}") from None
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise InputError(f"{folder}: images differ in size {sorted(shapes)}; pass --image-size")
    return np.stack(images), list(caps.values())


def _embed_captions(per_image: list[list[str]], encoder_dir: str, cache: Path | None):
    """Unique captions -> (table, choices, unique list); cached on disk by content."""
    from ddpm_rt.text import open_text_folder, read_text_folder

    uniq = sorted({c for caps in per_image for c in caps})
    index = {c: i for i, c in enumerate(uniq)}
    k = max(len(c) for c in per_image)
    choices = np.full((len(per_image), k), -1, dtype=np.int64)
    for i, caps in enumerate(per_image):
        choices[i, : len(caps)] = [index[c] for c in caps]
    # The cache is keyed by the encoder's recorded sha256; the encoder's files are hashed
    # only when they are used (so a cached run, e.g. on a training GPU machine, needs only the
    # folder's text.json beside the cache).
    meta = read_text_folder(encoder_dir, verify_hashes=False)
    sha = meta["files"][meta["graphs"]["fp32"]["file"]]["sha256"]
    key = hashlib.sha256(("\n".join(uniq) + sha).encode()).hexdigest()
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return z["table"], choices, uniq, sha
    read_text_folder(encoder_dir)  # every file present and matching its sha256
    # fp32: the reference embedding; the int8 runtime encoder approximates it (cos >= 0.99).
    enc = open_text_folder(encoder_dir, precision="fp32")
    table = enc.encode(uniq)
    if cache is not None:
        from ddpm_rt.bundle.fileio import atomic_write

        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda f: np.savez(f, key=np.array(key), table=table))
    return table, choices, uniq, sha


def load_dataset(
    data: str | Path,
    labels: str | Path | None = None,
    contexts: str | Path | None = None,
    label_names: list[str] | None = None,
    captions: str | Path | None = None,
    text_encoder: str | Path | None = None,
    image_size: int | None = None,
    cache: Path | None = None,
) -> Dataset:
    data = Path(data)
    if labels is not None and contexts is not None:
        raise InputError("give labels or contexts, not both")
    per_image: list[list[str]] | None = None
    names: list[str] = []
    latent = None
    table = choices = None
    if data.is_dir():
        images, per_image = load_imagefolder(data, image_size)
    else:
        arrays = _load_array(data, "data")
        if isinstance(arrays, dict):
            if "latents" in arrays and "images" not in arrays:
                latent = _latent_info(arrays, data)
                arrays["images"] = arrays["latents"]
            if "images" not in arrays:
                raise InputError(f"{data} has no 'images' array (found: {', '.join(arrays)})")
            images = arrays["images"]
            if labels is None and contexts is None and "contexts" in arrays:
                table = arrays["contexts"].astype(np.float32)
                choices = np.arange(len(images), dtype=np.int64)[:, None]
            elif labels is None and contexts is None and "labels" in arrays:
                if label_names is None and "label_names" in arrays:
                    label_names = [str(s) for s in arrays["label_names"]]
                table, choices, names = _labels(arrays["labels"], len(images), label_names)
            if captions is None and "captions" in arrays and text_encoder is not None:
                # One string per image; several alternatives are separated by newlines.
                per_image = [
                    [" ".join(a.split()) for a in str(c).split("\n") if a.strip()]
                    for c in arrays["captions"]
                ]
        else:
            images = arrays
        if labels is not None:
            lab = _load_array(Path(labels), "labels")
            if isinstance(lab, dict):
                raise InputError(f"labels file {labels} must be a .npy array")
            table, choices, names = _labels(lab, len(images), label_names)
        if contexts is not None:
            ctx = _load_array(Path(contexts), "contexts")
            if isinstance(ctx, dict):
                raise InputError(f"contexts file {contexts} must be a .npy array")
            table = np.asarray(ctx, dtype=np.float32)
            choices = np.arange(len(images), dtype=np.int64)[:, None]
    if captions is not None:
        per_image = read_captions_file(captions, len(images))
    if text_encoder is not None:
        if per_image is None and names:  # label-only data: label names become captions
            rows = table[choices[:, 0]]
            if not np.all(rows.sum(1) == 1) or not np.all(rows.max(1) == 1):
                raise InputError("multi-hot labels cannot become captions; give --captions")
            per_image = [[names[int(i)]] for i in rows.argmax(1)]
        if per_image is None:
            raise InputError(
                "a text encoder needs captions (--captions, an npz 'captions' "
                "array, an imagefolder, or integer labels with names)"
            )
        table, choices, uniq, sha = _embed_captions(per_image, str(text_encoder), cache)
        enc = {"path": str(Path(text_encoder).resolve()), "sha256": sha}
        return _checked(
            Dataset(images, table, choices, captions=uniq, text_encoder=enc, latent=latent)
        )
    if table is None:
        if per_image is not None:
            raise InputError(
                "captioned data needs --text-encoder DIR (make one with "
                "'ddpm-rt text export --out DIR')"
            )
        raise InputError(f"{data} has neither labels nor contexts: give --labels or --contexts")
    return _checked(Dataset(images, table, choices, label_names=names, latent=latent))


def _latent_info(arrays: dict, path: Path) -> dict:
    """The ``latent`` JSON of a file from ``ddpm-rt encode-latents``."""
    try:
        info = json.loads(str(arrays["latent"]))
        float(info["scale_factor"])
    except (KeyError, ValueError, TypeError):
        raise InputError(
            f"{path} has latents but no valid 'latent' record (make it with "
            "'ddpm-rt encode-latents')"
        ) from None
    return info


def _checked(ds: Dataset) -> Dataset:
    im = ds.images
    if ds.latent is not None:
        if im.dtype != np.float32 or im.ndim != 4:
            raise InputError(f"latents must be float32 (N, C, h, w), got {im.dtype} {im.shape}")
        if not np.isfinite(im).all():
            raise InputError("latents contain NaN or infinity")
    elif im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3:
        raise InputError(f"images must be uint8 (N, H, W, 3), got {im.dtype} {im.shape}")
    if len(im) == 0:
        raise InputError("the data set is empty")
    h, w = ds.image_size
    if h % 4 or w % 4:
        raise InputError(f"image size must be divisible by 4, got {h}x{w}")
    if ds.table.ndim != 2 or len(ds.choices) != len(im):
        raise InputError(f"contexts must be (N={len(im)}, D), got {ds.table.shape}")
    if not np.isfinite(ds.table).all():
        raise InputError("contexts contain NaN or infinity")
    return ds
