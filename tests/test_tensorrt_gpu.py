"""TensorRT on a real GPU: agreement with ONNX Runtime, engine reuse on a second daemon
start, INT8 calibration, the pipelined path, and throughput.

Every test is marked `gpu` and skips cleanly where TensorRT cannot run (no CUDA GPU, no
tensorrt or cuda-python). `make test-gpu` runs exactly these with `--require-gpu`, which
turns a skip into a failure and fails a run in which none passed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog

from monitor.config.settings import BackendConfig, TensorRTConfig, load_settings
from monitor.daemon import Daemon
from monitor.imaging.preprocess import prepare_batch
from monitor.inference.factory import resolve_backend
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
from monitor.inference.tensorrt_backend import (
    TensorRTAvailability,
    TensorRTBackend,
    create_tensorrt_backend,
    probe_tensorrt,
)
from monitor.manifest import LoadedModel, load_manifest
from monitor.runtime.systemd_notify import SystemdNotifier
from monitor.simulator import LABELS, CropSimulator

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
FP16_TOLERANCE = 1e-2  # max |p_tensorrt - p_onnxruntime| over every class of every crop
ENGINE_ONLY_FLOOR = 2000.0  # crops/s at batch 64; MobileNetV3-small at 96 px, any recent GPU


@pytest.fixture(scope="module")
def gpu() -> TensorRTAvailability:
    availability = probe_tensorrt()
    if not availability.available:
        pytest.skip(f"TensorRT cannot run here: {availability.reason}")
    return availability


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_manifest()  # the shipped model, monitor/models/default


@pytest.fixture(scope="module")
def crops() -> tuple[list[np.ndarray], list[str]]:
    """256 real crops from the probe simulator, both classes alternating."""
    simulator = CropSimulator(21)
    labels = [LABELS[i % 2] for i in range(256)]
    return [simulator.render(label) for label in labels], labels


@pytest.fixture(scope="module")
def batch(model: LoadedModel, crops: tuple[list[np.ndarray], list[str]]) -> np.ndarray:
    return prepare_batch(crops[0], model.manifest.input)


@pytest.fixture(scope="module")
def reference(model: LoadedModel, batch: np.ndarray) -> np.ndarray:
    """ONNX Runtime on CPU: the probabilities the daemon computes without a GPU."""
    onnxruntime = OnnxRuntimeBackend(model)
    try:
        return onnxruntime.infer(batch)
    finally:
        onnxruntime.close()


@pytest.fixture(scope="module")
def fp16(
    gpu: TensorRTAvailability, model: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TensorRTBackend]:
    backend = create_tensorrt_backend(
        model,
        TensorRTConfig(precision="fp16"),
        max_batch=64,
        cache_dir=tmp_path_factory.mktemp("engines"),
        availability=gpu,
    )
    yield backend
    backend.close()


@pytest.mark.parametrize("size", [1, 7, 64, 256])
def test_fp16_engine_agrees_with_onnxruntime(
    fp16: TensorRTBackend, batch: np.ndarray, reference: np.ndarray, size: int
) -> None:
    """Max probability difference ≤ 1e-2 on real crops, the out-of-distribution score (the
    last column) within 5 %; 256 runs as four batches of 64."""
    rows = fp16.infer(batch[:size])
    assert rows.shape == (size, reference.shape[1])
    assert rows.dtype == np.float32
    probabilities, expected = rows[:, :2], reference[:size, :2]
    difference = float(np.abs(probabilities - expected).max())
    assert difference <= FP16_TOLERANCE, f"max probability difference {difference:.4f}"
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=FP16_TOLERANCE)
    if reference.shape[1] > 2:
        np.testing.assert_allclose(rows[:, 2], reference[:size, 2], rtol=0.05)


def test_fp16_engine_classifies_the_simulated_crops(
    fp16: TensorRTBackend,
    batch: np.ndarray,
    model: LoadedModel,
    crops: tuple[list[np.ndarray], list[str]],
) -> None:
    probabilities = fp16.infer(batch)[:, : len(model.manifest.classes)]
    predicted = [model.manifest.classes[i] for i in probabilities.argmax(axis=1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, crops[1], strict=True)])
    assert accuracy >= 0.95


def test_submitted_batches_in_flight_return_the_same_as_infer(
    fp16: TensorRTBackend, batch: np.ndarray
) -> None:
    """Three batches queued on the stream before any is collected (more than the two
    buffer slots) come back intact and in order."""
    pieces = [batch[0:64], batch[64:100], batch[100:164]]
    pending = [fp16.submit(piece) for piece in pieces]
    results = [p.wait() for p in pending]
    for piece, result in zip(pieces, results, strict=True):
        np.testing.assert_allclose(result, fp16.infer(piece), atol=1e-6)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(0.05)
    yield path, listener
    listener.close()


def _datagrams(listener: socket.socket) -> list[str]:
    received = []
    while True:
        try:
            received.append(listener.recv(4096).decode())
        except TimeoutError:
            return received


def test_second_daemon_start_reuses_the_engine_and_starts_faster(
    gpu: TensorRTAvailability, tmp_path: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    """First start builds (logged first, systemd timeout extended), second loads the cache."""
    probe_folder = tmp_path / "probe"
    probe_folder.mkdir()
    settings = load_settings(
        data={
            "daemon": {"state_dir": str(tmp_path / "state")},
            "backend": {"type": "tensorrt"},
            "batcher": {"max_batch": 32},
            "probes": [{"id": "R1", "source": {"type": "folder", "path": str(probe_folder)}}],
        }
    )
    path, listener = notify_socket
    timings: list[float] = []
    events: list[list[str]] = []
    extensions: list[set[str]] = []
    for _ in range(2):
        daemon = Daemon(settings, notifier=SystemdNotifier(path))
        started = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            daemon.start()
        timings.append(time.monotonic() - started)
        daemon.stop()
        assert daemon.backend.name.startswith("tensorrt[fp16")
        events.append([str(entry["event"]) for entry in logs])
        extensions.append({d.strip() for d in _datagrams(listener) if "EXTEND_TIMEOUT" in d})
    build_extension = "EXTEND_TIMEOUT_USEC=180000000"  # engine_cache.BUILD_TIMEOUT_EXTENSION_S
    first, second = events
    assert first.index("engine_build_started") < first.index("engine_built")
    assert build_extension in extensions[0]
    assert "engine_build_started" not in second
    assert "engine_cache_hit" in second
    assert build_extension not in extensions[1]
    assert timings[1] < timings[0] / 2, f"start times {timings}"
    engines = list((tmp_path / "state" / "engines").glob("*.engine"))
    assert len(engines) == 1


def test_auto_picks_tensorrt_on_a_gpu_host(
    gpu: TensorRTAvailability, model: LoadedModel, tmp_path: Path
) -> None:
    with structlog.testing.capture_logs() as logs:
        backend = resolve_backend(BackendConfig(type="auto"), model, state_dir=tmp_path)
    try:
        assert backend.name == f"tensorrt[fp16, {gpu.gpu_name}]"
    finally:
        backend.close()
    (selected,) = [entry for entry in logs if entry["event"] == "backend_selected"]
    assert selected["reason"] == f"auto: {gpu.reason}"


def test_int8_engine_calibrated_on_crops_keeps_the_top_class(
    gpu: TensorRTAvailability,
    model: LoadedModel,
    batch: np.ndarray,
    reference: np.ndarray,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "calibration"
    folder.mkdir()
    simulator = CropSimulator(99)
    for index in range(128):
        label = LABELS[index % 2]
        cv2.imwrite(str(folder / f"{label}_{index:03d}.png"), simulator.render(label))
    backend = create_tensorrt_backend(
        model,
        TensorRTConfig(precision="int8", calibration_dir=folder),
        max_batch=64,
        cache_dir=tmp_path / "engines",
        availability=gpu,
    )
    try:
        probabilities = backend.infer(batch)
    finally:
        backend.close()
    same_top = probabilities[:, :2].argmax(axis=1) == reference[:, :2].argmax(axis=1)
    agreement = float(np.mean(same_top))
    assert agreement >= 0.9, f"INT8 top class agrees with FP32 on {agreement:.1%}"


def test_engine_only_throughput(fp16: TensorRTBackend, batch: np.ndarray) -> None:
    """Preloaded tensors, batch 64, pipelined submits: well above what a CPU does."""
    pieces = [batch[i : i + 64] for i in range(0, 256, 64)]
    fp16.infer(pieces[0])  # warm
    rounds = 20
    started = time.perf_counter()
    in_flight = None
    for _ in range(rounds):
        for piece in pieces:
            submitted = fp16.submit(piece)
            if in_flight is not None:
                in_flight.wait()
            in_flight = submitted
    assert in_flight is not None
    in_flight.wait()
    rate = rounds * len(batch) / (time.perf_counter() - started)
    print(f"TensorRT FP16 engine-only, batch 64: {rate:.0f} crops/s")
    assert rate >= ENGINE_ONLY_FLOOR


def test_build_engine_command_builds_then_reuses(gpu: TensorRTAvailability, tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "monitor", "build-engine", "--precision", "fp16",
        "--max-batch", "16", "--cache-dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}

    def build() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO, check=False
        )

    first = build()
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("engine built in ")
    second = build()
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("engine loaded from cache in ")
    assert len(list(tmp_path.glob("*.engine"))) == 1
