"""The seam between the pipeline and whatever runs the network."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from monitor.manifest import LoadedModel


class BackendUnavailableError(Exception):
    """A backend that cannot run on this host; the message names the fix."""


class Backend(Protocol):
    """Runs a classifier on a prepared batch and returns class probabilities."""

    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, C) float32 probabilities, rows summing to 1."""
        ...

    def close(self) -> None:
        """Release sessions, engines and device memory."""
        ...


def resolve_backend(kind: str, model: LoadedModel, *, threads: int = 0) -> Backend:
    """Build the backend named in config; raise BackendUnavailableError naming the fix."""
    from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend  # noqa: PLC0415

    if kind == "onnxruntime":
        return OnnxRuntimeBackend(model, threads=threads)
    raise BackendUnavailableError(f"unknown backend.type {kind!r} (use 'onnxruntime')")
