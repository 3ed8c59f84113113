"""ONNX Runtime backend: one InferenceSession per graph, created on first use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import BackendError, InputError


class OrtBackend:
    name = "ort"

    def __init__(self, graphs: dict[str, Path], providers: list[str] | None = None):
        """``graphs`` maps graph names to ONNX files."""
        available = ort.get_available_providers()
        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in available]
        if missing:
            raise InputError(
                f"ONNX Runtime provider(s) not available: {', '.join(missing)} "
                f"(available: {', '.join(available)})"
            )
        self.graphs = dict(graphs)
        self.providers = providers
        self._sessions: dict[str, ort.InferenceSession] = {}

    def session(self, graph: str) -> ort.InferenceSession:
        if graph not in self._sessions:
            if graph not in self.graphs:
                raise BackendError(f"no graph {graph!r} (have: {', '.join(self.graphs)})")
            path = self.graphs[graph]
            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # errors only; warnings would drown the progress bar
            try:
                self._sessions[graph] = ort.InferenceSession(
                    str(path), sess_options=opts, providers=self.providers
                )
            except Exception as e:  # ORT raises its own untyped errors
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise BackendError(f"ONNX Runtime cannot load {path}: {msg}") from None
        return self._sessions[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session(graph)
        try:
            outs = sess.run(None, feeds)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BackendError(f"ONNX Runtime failed running {graph}: {msg}") from None
        return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}
