"""Inference backends. Each has the same small interface::

backend.run(graph_name, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]
"""

from __future__ import annotations

from ..bundle import Bundle
from ..errors import InputError

BACKENDS = ("ort",)


def make_backend(name: str, bundle: Bundle, providers: list[str] | None = None):
    if name == "ort":
        from .ort import OrtBackend

        return OrtBackend({g: bundle.graph_path(g) for g in bundle.graphs}, providers=providers)
    raise InputError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")
