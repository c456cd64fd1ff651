"""TensorRT backend: an engine built from the model's ONNX, run on a CUDA stream.

`tensorrt` (the native TensorRT 10 Python API) and `cuda-python` (`cuda.bindings`, for the
stream, pinned host memory and asynchronous copies) are imported only when used, so this
module imports on any host; `probe_tensorrt` says why TensorRT cannot run where it cannot.

The engine has one optimization profile, batch 1 to the batcher's `max_batch` (tuned for
`max_batch`, the size of a batch under load), and is built in FP16, or in INT8 calibrated
on a folder of crops read through the daemon's own preprocessing. Engines are kept in an
`EngineCache` (see engine_cache.py for the key and the atomic write).

How preprocessing overlaps inference. Worker threads decode, cut and normalise crops while
the batcher thread runs the network; this backend lets the two meet without waiting:

- `submit(batch)` copies the batch into one of two pinned host buffers, queues the
  host-to-device copy, the engine and the device-to-host copy on a CUDA stream, records an
  event and returns at once; `PendingInference.wait()` blocks on that event. Each of the
  two slots has its own pinned and device buffers, so the next batch is written into the
  other slot while the GPU still works on the current one.
- The MicroBatcher sees `submit` (the `PipelinedBackend` protocol) and keeps one batch in
  flight: it submits batch N, packs and submits batch N+1 (the crops the workers prepared
  meanwhile), and only then collects N's probabilities.
- The wait is a blocking event synchronisation (`cudaEventBlockingSync`): the thread sleeps
  instead of spinning a core, and cuda-python makes the call without the GIL, so the decode
  workers keep the CPU during GPU work. (Written without a GPU at hand: the end-to-end
  column of bench/gpu_throughput.py is where this gets confirmed.)
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from monitor.config.settings import TensorRTConfig
from monitor.inference.backend import BackendUnavailableError
from monitor.inference.calibration import (
    CALIBRATION_BATCH,
    calibration_batches,
    calibration_files,
    calibration_fingerprint,
)
from monitor.inference.engine_cache import EngineCache, EngineKey, LoadedEngine, TimeoutExtender
from monitor.manifest import LoadedModel

log = structlog.get_logger(__name__)

TENSORRT_INSTALL = "pip install 'crystal-monitor[tensorrt]' on a GPU host"
SUPPORTED_TENSORRT_MAJOR = 10
WORKSPACE_BYTES = 1 << 30
SLOTS = 2  # double-buffered: one batch on the GPU, the next being written

Problem = Literal[
    "none", "not_installed", "import_failed", "unsupported_version", "no_cuda_python", "no_gpu"
]


@dataclass(frozen=True)
class TensorRTAvailability:
    """Whether TensorRT can run here; `reason` says why not, or what it runs on."""

    problem: Problem
    reason: str
    tensorrt_version: str = ""
    gpu_name: str = ""
    compute_capability: str = ""

    @property
    def available(self) -> bool:
        return self.problem == "none"


class EngineBuildError(Exception):
    """TensorRT could not parse the model or build or load its engine."""


def import_tensorrt() -> Any:
    import tensorrt  # noqa: PLC0415  (optional: only GPU hosts install it)

    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime module: `cuda.bindings.runtime` (12.6+), `cuda.cudart` before."""
    try:
        from cuda.bindings import runtime  # noqa: PLC0415
    except ImportError:
        from cuda import cudart as runtime  # noqa: PLC0415

    return runtime


def probe_tensorrt() -> TensorRTAvailability:
    """Import tensorrt and cuda-python and look for a CUDA GPU; never raises."""
    try:
        trt = import_tensorrt()
    except ImportError:
        return TensorRTAvailability(
            "not_installed", f"tensorrt is not installed ({TENSORRT_INSTALL})"
        )
    except Exception as exc:  # a broken CUDA install raises anything on import
        return TensorRTAvailability(
            "import_failed",
            f"tensorrt is installed but fails to import: {exc} (check the NVIDIA driver and "
            "CUDA libraries with `nvidia-smi`)",
        )
    version = str(getattr(trt, "__version__", "0"))
    if version.split(".", maxsplit=1)[0] != str(SUPPORTED_TENSORRT_MAJOR):
        return TensorRTAvailability(
            "unsupported_version",
            f"tensorrt {version} is installed; this backend needs TensorRT "
            f"{SUPPORTED_TENSORRT_MAJOR}.x (TensorRT 11 removed the FP16/INT8 builder flags "
            "and calibrators it uses): pip install 'tensorrt>=10,<11'",
            tensorrt_version=version,
        )
    try:
        cudart = import_cudart()
    except ImportError:
        return TensorRTAvailability(
            "no_cuda_python",
            f"cuda-python is not installed ({TENSORRT_INSTALL})",
            tensorrt_version=version,
        )
    try:
        count = _cuda(cudart, cudart.cudaGetDeviceCount())
        if count < 1:
            raise RuntimeError("cudaGetDeviceCount found 0 devices")
        properties = _cuda(cudart, cudart.cudaGetDeviceProperties(0))
    except Exception as exc:
        return TensorRTAvailability(
            "no_gpu",
            f"no usable CUDA GPU ({exc}; check the driver with `nvidia-smi`)",
            tensorrt_version=version,
        )
    name = properties.name
    gpu = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).strip("\0 ")
    capability = f"{properties.major}.{properties.minor}"
    return TensorRTAvailability(
        "none",
        f"TensorRT {version} on {gpu} (compute {capability})",
        tensorrt_version=version,
        gpu_name=gpu,
        compute_capability=capability,
    )


def _cuda(cudart: Any, result: Any) -> Any:
    """cuda-python returns (error, *values): raise on an error, return the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(error)
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# -- engine key, build and load ---------------------------------------------------------


def engine_key(
    model: LoadedModel,
    availability: TensorRTAvailability,
    settings: TensorRTConfig,
    *,
    max_batch: int,
    calibration: list[Path] | None = None,
) -> EngineKey:
    """The cache key of the engine this model, host and configuration need."""
    return EngineKey(
        onnx_sha256=model.manifest.onnx_sha256,
        tensorrt_version=availability.tensorrt_version,
        gpu_name=availability.gpu_name,
        compute_capability=availability.compute_capability,
        precision=settings.precision,
        min_batch=1,
        opt_batch=max_batch,
        max_batch=max_batch,
        calibration=calibration_fingerprint(calibration) if calibration is not None else "",
    )


_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()


def _trt_logger(trt: Any) -> Any:
    """One TensorRT logger for the process (TensorRT wants the same one for all objects)."""
    global _LOGGER  # noqa: PLW0603
    with _LOGGER_LOCK:
        if _LOGGER is None:
            _LOGGER = trt.Logger(trt.Logger.WARNING)
        return _LOGGER


def build_engine(
    onnx_path: Path,
    *,
    input_size: int,
    precision: Literal["fp16", "int8"],
    max_batch: int,
    calibration: list[np.ndarray] | None = None,
) -> bytes:
    """Parse the ONNX file and build a serialized engine (seconds to minutes)."""
    trt = import_tensorrt()
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise EngineBuildError(
            f"{onnx_path}: expected one input and one output, found "
            f"{network.num_inputs} and {network.num_outputs}"
        )
    input_name = network.get_input(0).name

    def shape(batch: int) -> tuple[int, int, int, int]:
        return (batch, 3, input_size, input_size)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shape(1), shape(max_batch), shape(max_batch))
    config.add_optimization_profile(profile)
    # FP16 also for INT8 engines: layers without an INT8 kernel fall back to FP16, not FP32.
    config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if precision == "int8":
        if not calibration:
            raise EngineBuildError("INT8 needs calibration batches")
        config.set_flag(trt.BuilderFlag.INT8)
        calibration_profile = builder.create_optimization_profile()
        size = len(calibration[0])
        calibration_profile.set_shape(input_name, shape(size), shape(size), shape(size))
        config.set_calibration_profile(calibration_profile)
        calibrator = _create_calibrator(trt, calibration)
        config.int8_calibrator = calibrator
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT could not build an engine for {onnx_path} (its messages above say why)"
        )
    return bytes(serialized)


def _create_calibrator(trt: Any, batches: list[np.ndarray]) -> Any:
    """An entropy calibrator feeding `batches` through one device buffer."""
    cudart = import_cudart()
    host_to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice

    class FolderCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = batches
            self._index = 0
            self._device: Any = _cuda(cudart, cudart.cudaMalloc(batches[0].nbytes))

        def get_batch_size(self) -> int:
            return len(self._batches[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._index >= len(self._batches):
                return None
            batch = np.ascontiguousarray(self._batches[self._index], dtype=np.float32)
            self._index += 1
            _cuda(
                cudart,
                cudart.cudaMemcpy(self._device, batch.ctypes.data, batch.nbytes, host_to_device),
            )
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            return None  # the engine cache keeps the result; calibration runs once per key

        def write_calibration_cache(self, cache: bytes) -> None:
            return None

        def free(self) -> None:
            if self._device is not None:
                _cuda(cudart, cudart.cudaFree(self._device))
                self._device = None

    return FolderCalibrator()


@dataclass
class DeserializedEngine:
    """The engine with the runtime that made it (the runtime must outlive the engine)."""

    runtime: Any
    engine: Any


def deserialize_engine(payload: bytes) -> DeserializedEngine:
    trt = import_tensorrt()
    runtime = trt.Runtime(_trt_logger(trt))
    engine = runtime.deserialize_cuda_engine(payload)
    if engine is None:
        raise EngineBuildError("TensorRT could not deserialize the engine")
    return DeserializedEngine(runtime, engine)


def engine_cache_dir(settings: TensorRTConfig, state_dir: Path) -> Path:
    return settings.engine_cache_dir or Path(state_dir) / "engines"


def prepare_engine(
    model: LoadedModel,
    settings: TensorRTConfig,
    *,
    max_batch: int,
    cache_dir: Path,
    availability: TensorRTAvailability,
    extend_timeout: TimeoutExtender | None = None,
    force: bool = False,
) -> LoadedEngine[DeserializedEngine]:
    """The engine for this model, host and configuration: cached, or built and cached."""
    if not availability.available:
        raise BackendUnavailableError(availability.reason)
    spec = model.manifest.input
    files = None
    if settings.precision == "int8":
        if settings.calibration_dir is None:
            raise BackendUnavailableError(
                "precision = 'int8' needs backend.tensorrt.calibration_dir (or --calibration)"
            )
        files = calibration_files(settings.calibration_dir)
    key = engine_key(model, availability, settings, max_batch=max_batch, calibration=files)

    def build() -> bytes:
        batches = None
        if files is not None:
            batches = calibration_batches(files, spec, batch_size=min(CALIBRATION_BATCH, max_batch))
        return build_engine(
            model.onnx_path,
            input_size=spec.size,
            precision=settings.precision,
            max_batch=max_batch,
            calibration=batches,
        )

    return EngineCache(cache_dir).load_or_build(
        key,
        build=build,
        deserialize=deserialize_engine,
        extend_timeout=extend_timeout,
        force=force,
    )


def create_tensorrt_backend(
    model: LoadedModel,
    settings: TensorRTConfig,
    *,
    max_batch: int,
    cache_dir: Path,
    availability: TensorRTAvailability,
    extend_timeout: TimeoutExtender | None = None,
) -> TensorRTBackend:
    loaded = prepare_engine(
        model,
        settings,
        max_batch=max_batch,
        cache_dir=cache_dir,
        availability=availability,
        extend_timeout=extend_timeout,
    )
    backend = TensorRTBackend(
        loaded.engine,
        input_size=model.manifest.input.size,
        max_batch=max_batch,
        label=f"tensorrt[{settings.precision}, {availability.gpu_name}]",
    )
    backend.engine_path = loaded.path
    backend.engine_origin = loaded.origin
    backend.engine_seconds = loaded.seconds
    return backend


# -- execution ---------------------------------------------------------------------------


def _pinned(cudart: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[np.ndarray, int]:
    """A numpy view of page-locked host memory (fast, truly asynchronous copies)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    pointer = int(_cuda(cudart, cudart.cudaMallocHost(nbytes)))
    buffer = (ctypes.c_byte * nbytes).from_address(pointer)
    return np.frombuffer(memoryview(buffer).cast("B"), dtype=dtype).reshape(shape), pointer


@dataclass(eq=False)
class _Slot:
    host_in: np.ndarray
    host_in_ptr: int
    host_out: np.ndarray
    host_out_ptr: int
    device_in: int
    device_out: int
    event: Any
    pending: PendingInference | None = None


@dataclass(eq=False)
class PendingInference:
    """One submitted batch; `wait()` returns its (n, C) probabilities."""

    _backend: TensorRTBackend
    _slot: _Slot
    _rows: int
    _result: np.ndarray | None = field(default=None)

    def wait(self) -> np.ndarray:
        if self._result is None:
            self._backend._complete(self)
        assert self._result is not None
        return self._result


class TensorRTBackend:
    """Runs a deserialized engine on its own CUDA stream with two pinned buffer slots."""

    def __init__(
        self, engine: DeserializedEngine, *, input_size: int, max_batch: int, label: str
    ) -> None:
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        self._engine = engine
        cuda_engine = engine.engine
        names = [cuda_engine.get_tensor_name(i) for i in range(cuda_engine.num_io_tensors)]
        inputs = [n for n in names if cuda_engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineBuildError(f"expected one input and one output tensor, found {names}")
        self._input, self._output = inputs[0], outputs[0]
        self._classes = int(cuda_engine.get_tensor_shape(self._output)[-1])
        in_dtype = np.dtype(trt.nptype(cuda_engine.get_tensor_dtype(self._input)))
        self._out_dtype = np.dtype(trt.nptype(cuda_engine.get_tensor_dtype(self._output)))
        self._context = cuda_engine.create_execution_context()
        self._size = input_size
        self.max_batch = max_batch
        self.name = label
        self.engine_path: Path | None = None
        self.engine_origin: str = ""
        self.engine_seconds = 0.0
        self._lock = threading.Lock()
        self._stream = _cuda(cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        event_flags = cudart.cudaEventBlockingSync | cudart.cudaEventDisableTiming
        self._slots: list[_Slot] = []
        for _ in range(SLOTS):
            host_in, host_in_ptr = _pinned(cudart, (max_batch, 3, input_size, input_size), in_dtype)
            host_out, host_out_ptr = _pinned(cudart, (max_batch, self._classes), self._out_dtype)
            self._slots.append(
                _Slot(
                    host_in=host_in,
                    host_in_ptr=host_in_ptr,
                    host_out=host_out,
                    host_out_ptr=host_out_ptr,
                    device_in=int(_cuda(cudart, cudart.cudaMalloc(host_in.nbytes))),
                    device_out=int(_cuda(cudart, cudart.cudaMalloc(host_out.nbytes))),
                    event=_cuda(cudart, cudart.cudaEventCreateWithFlags(event_flags)),
                )
            )
        self._next_slot = 0
        self._closed = False

    def submit(self, batch: np.ndarray) -> PendingInference:
        """Queue copy-in, inference and copy-out of up to max_batch crops; returns at once."""
        rows = len(batch)
        if not 1 <= rows <= self.max_batch:
            raise ValueError(f"batch of {rows} crops; this engine takes 1 to {self.max_batch}")
        cudart = self._cudart
        with self._lock:
            if self._closed:
                raise RuntimeError("TensorRT backend is closed")
            slot = self._slots[self._next_slot]
            self._next_slot = (self._next_slot + 1) % SLOTS
            if slot.pending is not None:  # the caller ran ahead: free the slot first
                self._complete_locked(slot.pending)
            np.copyto(slot.host_in[:rows], batch, casting="same_kind")
            in_bytes = slot.host_in[:rows].nbytes
            out_bytes = slot.host_out[:rows].nbytes
            _cuda(
                cudart,
                cudart.cudaMemcpyAsync(
                    slot.device_in,
                    slot.host_in_ptr,
                    in_bytes,
                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                    self._stream,
                ),
            )
            context = self._context
            if not context.set_input_shape(self._input, (rows, 3, self._size, self._size)):
                raise RuntimeError(f"TensorRT refused input shape ({rows}, 3, ...)")
            context.set_tensor_address(self._input, slot.device_in)
            context.set_tensor_address(self._output, slot.device_out)
            if not context.execute_async_v3(int(self._stream)):
                raise RuntimeError("TensorRT could not enqueue the batch")
            _cuda(
                cudart,
                cudart.cudaMemcpyAsync(
                    slot.host_out_ptr,
                    slot.device_out,
                    out_bytes,
                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                    self._stream,
                ),
            )
            _cuda(cudart, cudart.cudaEventRecord(slot.event, self._stream))
            pending = PendingInference(self, slot, rows)
            slot.pending = pending
            return pending

    def _complete(self, pending: PendingInference) -> None:
        with self._lock:
            self._complete_locked(pending)

    def _complete_locked(self, pending: PendingInference) -> None:
        if pending._result is not None:
            return
        if self._closed:
            raise RuntimeError("TensorRT backend is closed")
        slot = pending._slot
        # Blocking sync: sleeps (no spinning core, no GIL) until the copy-out is done.
        _cuda(self._cudart, self._cudart.cudaEventSynchronize(slot.event))
        pending._result = np.array(slot.host_out[: pending._rows], dtype=np.float32)
        slot.pending = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Synchronous inference of any number of crops (split into max_batch pieces)."""
        if len(batch) == 0:
            return np.empty((0, self._classes), np.float32)
        pieces = [
            self.submit(batch[start : start + self.max_batch])
            for start in range(0, len(batch), self.max_batch)
        ]
        results = [piece.wait() for piece in pieces]
        return results[0] if len(results) == 1 else np.concatenate(results)

    def close(self) -> None:
        cudart = self._cudart
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _cuda(cudart, cudart.cudaStreamSynchronize(self._stream))
            for slot in self._slots:
                cudart.cudaFreeHost(slot.host_in_ptr)
                cudart.cudaFreeHost(slot.host_out_ptr)
                cudart.cudaFree(slot.device_in)
                cudart.cudaFree(slot.device_out)
                cudart.cudaEventDestroy(slot.event)
            cudart.cudaStreamDestroy(self._stream)
            self._slots = []
            del self._context
            del self._engine
