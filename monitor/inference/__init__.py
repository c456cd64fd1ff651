"""Inference: the Backend protocol, its implementations and the choice between them."""

from monitor.inference.backend import (
    Backend,
    BackendUnavailableError,
    PipelinedBackend,
    resolve_backend,
    select_backend,
)
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "OnnxRuntimeBackend",
    "PipelinedBackend",
    "resolve_backend",
    "select_backend",
]
