"""Training data: uint8 images (N, H, W, 3) with a conditioning vector per image.

Accepted forms (a file that does not fit gets a one-line :class:`InputError`):

* ``.npz`` with ``images`` and either ``labels`` ((N,) integers or (N, K) one-/multi-hot)
  plus optional ``label_names`` (K,), or ``contexts`` ((N, D) float vectors);
* ``.npy`` images plus a separate ``.npy`` of labels or contexts -- the course's format
  (sprites ``(N, 16, 16, 3)`` uint8 + one-hot labels ``(N, 5)``) loads as is.

Labels become one-hot (or the given multi-hot rows) context vectors, as in the course.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ddpm_rt.errors import InputError


@dataclass
class Dataset:
    images: np.ndarray  # (N, H, W, 3) uint8
    contexts: np.ndarray  # (N, D) float32
    label_names: list[str] = field(default_factory=list)  # empty for free-form vectors

    @property
    def conditioning(self) -> dict:
        if self.label_names:
            return {
                "kind": "label",
                "context_dim": self.context_dim,
                "label_names": list(self.label_names),
            }
        return {"kind": "vector", "context_dim": self.context_dim}

    @property
    def context_dim(self) -> int:
        return int(self.contexts.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

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


def _labels_to_contexts(labels: np.ndarray, n: int, names: list[str] | None) -> tuple:
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
        contexts = np.eye(k, dtype=np.float32)[labels]
    elif labels.ndim == 2:
        contexts = labels.astype(np.float32)
        k = contexts.shape[1]
    else:
        raise InputError(f"labels must be (N,) or (N, K), got shape {labels.shape}")
    if names is None:
        names = [str(i) for i in range(k)]
    if len(names) != k:
        raise InputError(f"{len(names)} label names for {k} labels")
    if len(set(names)) != len(names):
        raise InputError("label names must be unique")
    return contexts, [str(s) for s in names]


def parse_label_names(value: str | None) -> list[str] | None:
    """``a,b,c`` or a text file with one name per line."""
    if value is None:
        return None
    p = Path(value)
    if p.is_file():
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return [s.strip() for s in value.split(",") if s.strip()]


def load_dataset(
    data: str | Path,
    labels: str | Path | None = None,
    contexts: str | Path | None = None,
    label_names: list[str] | None = None,
) -> Dataset:
    data = Path(data)
    arrays = _load_array(data, "data")
    if isinstance(arrays, dict):
        if "images" not in arrays:
            raise InputError(f"{data} has no 'images' array (found: {', '.join(arrays)})")
        images = arrays["images"]
        if labels is None and contexts is None:
            if "labels" in arrays:
                lab = arrays["labels"]
                if label_names is None and "label_names" in arrays:
                    label_names = [str(s) for s in arrays["label_names"]]
                ctx, names = _labels_to_contexts(lab, len(images), label_names)
                return _checked(Dataset(images, ctx, names))
            if "contexts" in arrays:
                return _checked(Dataset(images, arrays["contexts"].astype(np.float32)))
            raise InputError(f"{data} has neither 'labels' nor 'contexts'")
    else:
        images = arrays
    if labels is not None and contexts is not None:
        raise InputError("give labels or contexts, not both")
    if labels is not None:
        lab = _load_array(Path(labels), "labels")
        if isinstance(lab, dict):
            raise InputError(f"labels file {labels} must be a .npy array")
        ctx, names = _labels_to_contexts(lab, len(images), label_names)
        return _checked(Dataset(images, ctx, names))
    if contexts is not None:
        ctx = _load_array(Path(contexts), "contexts")
        if isinstance(ctx, dict):
            raise InputError(f"contexts file {contexts} must be a .npy array")
        return _checked(Dataset(images, np.asarray(ctx, dtype=np.float32)))
    raise InputError(f"{data} holds only images: give --labels or --contexts")


def _checked(ds: Dataset) -> Dataset:
    im = ds.images
    if im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] != 3:
        raise InputError(f"images must be uint8 (N, H, W, 3), got {im.dtype} {im.shape}")
    if len(im) == 0:
        raise InputError("the data set is empty")
    h, w = im.shape[1:3]
    if h % 4 or w % 4:
        raise InputError(f"image size must be divisible by 4, got {h}x{w}")
    if ds.contexts.ndim != 2 or len(ds.contexts) != len(im):
        raise InputError(f"contexts must be (N={len(im)}, D), got {ds.contexts.shape}")
    if not np.isfinite(ds.contexts).all():
        raise InputError("contexts contain NaN or infinity")
    return ds
