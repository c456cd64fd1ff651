"""Loading the model and making its backend ready, with systemd told to wait."""

from __future__ import annotations

import numpy as np
import structlog

from monitor.config.settings import Settings
from monitor.inference.backend import Backend
from monitor.inference.factory import resolve_backend
from monitor.manifest import LoadedModel, describe_model_quality, load_manifest
from monitor.runtime.systemd_notify import SystemdNotifier

log = structlog.get_logger(__name__)

MODEL_LOAD_TIMEOUT_S = 120.0  # EXTEND_TIMEOUT_USEC for model load, warm-up and engine builds


def load_model(settings: Settings, notifier: SystemdNotifier) -> LoadedModel:
    """The manifest and ONNX file (sha256 verified), its quality figures logged."""
    notifier.extend_timeout(MODEL_LOAD_TIMEOUT_S)
    notifier.status("loading model")
    model = load_manifest(settings.model.path)
    manifest = model.manifest
    log.info(
        "model_loaded",
        name=manifest.name,
        version=manifest.version,
        classes=list(manifest.classes),
        sha256=manifest.onnx_sha256[:12],
        **describe_model_quality(manifest),
    )
    return model


def ready_backend(settings: Settings, model: LoadedModel, notifier: SystemdNotifier) -> Backend:
    """The backend the configuration asks for, warmed up on one batch."""
    backend = resolve_backend(
        settings.backend,
        model,
        max_batch=settings.batcher.max_batch,
        state_dir=settings.daemon.state_dir,
        extend_timeout=notifier.extend_timeout,  # a TensorRT engine build takes minutes
    )
    try:
        size = model.manifest.input.size
        backend.infer(np.zeros((1, 3, size, size), np.float32))  # warm-up
    except BaseException:
        backend.close()
        raise
    log.info("backend_ready", backend=backend.name)
    return backend
