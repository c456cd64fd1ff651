"""Inference: the Backend protocol and its implementations."""

from monitor.inference.backend import Backend, BackendUnavailableError, resolve_backend
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend

__all__ = ["Backend", "BackendUnavailableError", "OnnxRuntimeBackend", "resolve_backend"]
