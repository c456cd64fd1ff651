"""Which backend runs the model here, and building it: TensorRT on a GPU host that can,
ONNX Runtime elsewhere. Heavy imports happen only for the backend chosen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import structlog

from monitor.config.settings import BackendConfig, BackendType, DaemonConfig
from monitor.inference.backend import DEFAULT_MAX_BATCH, Backend, BackendUnavailableError
from monitor.manifest import LoadedModel

if TYPE_CHECKING:
    from monitor.inference.tensorrt_backend import TensorRTAvailability

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class BackendChoice:
    """Which backend to build and why (logged at start, shown by `doctor`)."""

    kind: Literal["tensorrt", "onnxruntime"]
    reason: str


def tensorrt_unavailable_message(reason: str) -> str:
    return (
        f"backend.type = 'tensorrt' but TensorRT cannot run on this host: {reason}. "
        "Fix that, or set backend.type = 'auto' (falls back to ONNX Runtime) or 'onnxruntime'"
    )


def select_backend(kind: BackendType, tensorrt: TensorRTAvailability | None) -> BackendChoice:
    """Pure: the backend for `backend.type` given what TensorRT can do here.

    auto takes TensorRT when it can run, else ONNX Runtime; a forced 'tensorrt' that
    cannot run raises BackendUnavailableError naming the fix.
    """
    if kind == "onnxruntime":
        return BackendChoice("onnxruntime", "backend.type = 'onnxruntime'")
    if tensorrt is not None and tensorrt.available:
        return BackendChoice("tensorrt", f"{kind}: {tensorrt.reason}")
    reason = tensorrt.reason if tensorrt is not None else "not probed"
    if kind == "tensorrt":
        raise BackendUnavailableError(tensorrt_unavailable_message(reason))
    return BackendChoice("onnxruntime", f"auto: TensorRT not usable: {reason}")


def as_backend_config(backend: BackendConfig | str, threads: int | None = None) -> BackendConfig:
    """A BackendConfig from a config section or a bare type name (`classify`, benchmarks)."""
    if isinstance(backend, str):
        if backend not in get_args(BackendType):
            raise BackendUnavailableError(
                f"unknown backend.type {backend!r} (use 'auto', 'tensorrt' or 'onnxruntime')"
            )
        return BackendConfig.model_validate({"type": backend, "threads": threads or 0})
    if threads is not None:
        return backend.model_copy(update={"threads": threads})
    return backend


def resolve_backend(
    backend: BackendConfig | str,
    model: LoadedModel,
    *,
    threads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    state_dir: Path | None = None,
    extend_timeout: Callable[[float], object] | None = None,
) -> Backend:
    """Build the backend the configuration asks for and log which one and why.

    `max_batch` is the batcher's (the TensorRT engine's profile reaches it); engines are
    cached under `backend.tensorrt.engine_cache_dir` or `state_dir`/engines, and
    `extend_timeout` (systemd's EXTEND_TIMEOUT_USEC) is called while one builds. With
    'auto', a TensorRT engine that fails to build falls back to ONNX Runtime, logged.
    Raises BackendUnavailableError, naming the fix, when a forced backend cannot run.
    """
    from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend  # noqa: PLC0415

    config = as_backend_config(backend, threads)
    availability = None
    if config.type != "onnxruntime":
        from monitor.inference.tensorrt_backend import probe_tensorrt  # noqa: PLC0415

        availability = probe_tensorrt()
    choice = select_backend(config.type, availability)
    if choice.kind == "tensorrt":
        assert availability is not None
        from monitor.inference.tensorrt_backend import (  # noqa: PLC0415
            create_tensorrt_backend,
            engine_cache_dir,
        )

        try:
            tensorrt_backend = create_tensorrt_backend(
                model,
                config.tensorrt,
                max_batch=max_batch,
                cache_dir=engine_cache_dir(config.tensorrt, state_dir or DaemonConfig().state_dir),
                availability=availability,
                extend_timeout=extend_timeout,
            )
        except Exception as exc:
            if config.type == "tensorrt":
                raise
            log.error("tensorrt_failed", error=str(exc), fallback="onnxruntime")
            choice = BackendChoice("onnxruntime", f"auto: TensorRT failed: {exc}")
        else:
            log.info(
                "backend_selected",
                backend=tensorrt_backend.name,
                requested=config.type,
                reason=choice.reason,
                engine=str(tensorrt_backend.engine_path),
                engine_origin=tensorrt_backend.engine_origin,
            )
            return tensorrt_backend
    onnxruntime_backend = OnnxRuntimeBackend(model, threads=config.threads)
    if config.type != "onnxruntime":  # a choice was made: say why (`classify` made none)
        log.info(
            "backend_selected",
            backend=onnxruntime_backend.name,
            requested=config.type,
            reason=choice.reason,
        )
    return onnxruntime_backend
