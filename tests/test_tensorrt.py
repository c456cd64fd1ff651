"""The TensorRT backend without a GPU: the engine cache (key, atomic write, recovery),
backend selection and its fallback, the clear error when TensorRT is forced, the
build-engine and doctor commands, INT8 calibration data and the pipelined batcher.

The engine build and TensorRT's deserializer are stubbed at the boundary only (functions
handed to the cache); the cache logic, files and logging are the real ones. What needs a
GPU is in test_tensorrt_gpu.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog

from monitor.cli.doctor import check_engine_cache
from monitor.cli.main import main
from monitor.config.settings import (
    EX_CONFIG,
    BackendConfig,
    ConfigError,
    TensorRTConfig,
    load_settings,
)
from monitor.imaging.preprocess import prepare_batch
from monitor.inference.backend import BackendUnavailableError
from monitor.inference.calibration import (
    CalibrationError,
    calibration_batches,
    calibration_files,
    calibration_fingerprint,
)
from monitor.inference.engine_cache import (
    EngineCache,
    EngineKey,
    decode_engine_file,
    keep_extending_timeout,
)
from monitor.inference.factory import resolve_backend, select_backend
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
from monitor.inference.tensorrt_backend import (
    EngineBuildError,
    TensorRTAvailability,
    engine_key,
    probe_tensorrt,
)
from monitor.manifest import LoadedModel, load_manifest
from monitor.pipeline.batcher import MicroBatcher
from monitor.runtime.systemd_notify import SystemdNotifier
from monitor.simulator import LABELS, CropSimulator

REPO = Path(__file__).resolve().parents[1]

KEY = EngineKey(
    onnx_sha256="3adc3e168f0152bd7849e2fa64ebc677bf949f8a15a659d2db2b5947648eb72c",
    tensorrt_version="10.7.0",
    gpu_name="NVIDIA L4",
    compute_capability="8.9",
    precision="fp16",
    min_batch=1,
    opt_batch=32,
    max_batch=32,
)
ON_A_GPU_HOST = TensorRTAvailability(
    "none",
    "TensorRT 10.7.0 on NVIDIA L4 (compute 8.9)",
    tensorrt_version="10.7.0",
    gpu_name="NVIDIA L4",
    compute_capability="8.9",
)
NOT_INSTALLED = TensorRTAvailability("not_installed", "tensorrt is not installed (pip ...)")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_manifest()


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import tensorrt` fails, as on a host without it (also on a GPU host running this)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _crops(count: int, seed: int = 5) -> tuple[list[np.ndarray], list[str]]:
    simulator = CropSimulator(seed)
    labels = [LABELS[i % 2] for i in range(count)]
    return [simulator.render(label) for label in labels], labels


class Builder:
    """The engine build, stubbed at the boundary: counts calls, returns given bytes."""

    def __init__(self, *payloads: bytes, logs: list[dict[str, object]] | None = None) -> None:
        self.payloads = list(payloads)
        self.calls = 0
        self.logs = logs
        self.events_before_build: list[str] = []

    def __call__(self) -> bytes:
        self.calls += 1
        if self.logs is not None:
            self.events_before_build = [str(entry["event"]) for entry in self.logs]
        return self.payloads.pop(0)


def deserialize(payload: bytes) -> tuple[str, bytes]:
    """TensorRT's deserializer, stubbed: refuses what is not an 'ENGINE' payload."""
    if not payload.startswith(b"ENGINE"):
        raise EngineBuildError("TensorRT could not deserialize the engine")
    return ("engine", payload)


def _events(logs: list[dict[str, object]]) -> list[str]:
    return [str(entry["event"]) for entry in logs]


# -- the cache key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("onnx_sha256", "0" * 64),
        ("tensorrt_version", "10.8.0"),
        ("gpu_name", "NVIDIA A100-SXM4-40GB"),
        ("compute_capability", "8.0"),
        ("precision", "int8"),
        ("min_batch", 2),
        ("opt_batch", 16),
        ("max_batch", 64),
        ("calibration", "f" * 64),
    ],
)
def test_every_key_component_changes_the_engine_file(field: str, other: object) -> None:
    changed = dataclasses.replace(KEY, **{field: other})
    assert changed.digest != KEY.digest
    assert changed.file_name != KEY.file_name


def test_the_key_covers_every_field_and_its_digest_is_stable() -> None:
    """The digest is the sha256 of the key's canonical JSON: the same on every host and run."""
    tested = {
        "onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability", "precision",
        "min_batch", "opt_batch", "max_batch", "calibration",
    }  # fmt: skip
    assert {f.name for f in dataclasses.fields(EngineKey)} == tested
    canonical = json.dumps(dataclasses.asdict(KEY), sort_keys=True, separators=(",", ":"))
    assert KEY.digest == hashlib.sha256(canonical.encode()).hexdigest()
    assert dataclasses.replace(KEY).digest == KEY.digest
    assert KEY.file_name == f"3adc3e168f01-fp16-b1-32-{KEY.digest[:16]}.engine"


def test_engine_key_comes_from_the_model_the_host_and_the_settings(
    model: LoadedModel, tmp_path: Path
) -> None:
    key = engine_key(model, ON_A_GPU_HOST, TensorRTConfig(), max_batch=128)
    assert key == EngineKey(
        onnx_sha256=model.manifest.onnx_sha256,
        tensorrt_version="10.7.0",
        gpu_name="NVIDIA L4",
        compute_capability="8.9",
        precision="fp16",
        min_batch=1,
        opt_batch=128,
        max_batch=128,
        calibration="",
    )
    folder = _write_crops(tmp_path / "calibration", 4)
    files = calibration_files(folder)
    int8 = TensorRTConfig(precision="int8", calibration_dir=folder)
    int8_key = engine_key(model, ON_A_GPU_HOST, int8, max_batch=128, calibration=files)
    assert int8_key.precision == "int8"
    assert int8_key.calibration == calibration_fingerprint(files)
    # Other calibration images make another INT8 engine.
    cv2.imwrite(str(files[0]), np.full((40, 40), 200, np.uint8))
    assert calibration_fingerprint(files) != int8_key.calibration


# -- atomic write ----------------------------------------------------------------------------


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_an_engine_is_written_whole_with_its_key_and_checksum(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    path = cache.write(KEY, b"ENGINE-1", build_seconds=42.0)
    assert path == tmp_path / "engines" / KEY.file_name
    header, payload = decode_engine_file(path.read_bytes())
    assert payload == b"ENGINE-1"
    assert header["key"] == KEY.to_json()
    assert header["payload_sha256"] == hashlib.sha256(b"ENGINE-1").hexdigest()
    assert header["build_seconds"] == 42.0
    assert path.stat().st_mode & 0o777 == 0o644
    assert _temporaries(path.parent) == []
    assert cache.read(KEY) == b"ENGINE-1"


def test_a_crash_before_the_rename_leaves_the_previous_engine_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = EngineCache(tmp_path)
    cache.write(KEY, b"ENGINE-old", build_seconds=1.0)

    def crash(source: str, destination: str) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        cache.write(KEY, b"ENGINE-new", build_seconds=1.0)
    monkeypatch.undo()
    assert cache.read(KEY) == b"ENGINE-old"
    assert _temporaries(tmp_path) == []


def test_a_failed_fsync_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = EngineCache(tmp_path)

    def failing_fsync(descriptor: int) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        cache.write(KEY, b"ENGINE-1", build_seconds=1.0)
    monkeypatch.undo()
    assert not cache.path_for(KEY).exists()
    assert _temporaries(tmp_path) == []


def test_temporaries_of_crashed_builds_are_removed_once_stale(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    stale = tmp_path / f".{KEY.file_name}.abc123.tmp"
    fresh = tmp_path / f".{KEY.file_name}.def456.tmp"  # another process building right now
    stale.write_bytes(b"half an engine")
    fresh.write_bytes(b"half an engine")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    assert cache.remove_stale_temporaries() == 1
    assert _temporaries(tmp_path) == [fresh]


# -- load, build, recover -----------------------------------------------------------------------


def test_a_missing_engine_is_logged_then_built_then_reused(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    with structlog.testing.capture_logs() as logs:
        builder = Builder(b"ENGINE-1", logs=logs)
        first = cache.load_or_build(KEY, build=builder, deserialize=deserialize)
        second = cache.load_or_build(KEY, build=builder, deserialize=deserialize)
    assert (first.origin, first.engine) == ("built", ("engine", b"ENGINE-1"))
    assert (second.origin, second.engine) == ("cache", ("engine", b"ENGINE-1"))
    assert builder.calls == 1
    assert builder.events_before_build == ["engine_build_started"]
    assert _events(logs) == ["engine_build_started", "engine_built", "engine_cache_hit"]
    started = logs[0]
    assert started["path"] == str(cache.path_for(KEY))
    assert started["engine"] == "fp16, batch 1-32, TensorRT 10.7.0, NVIDIA L4 (compute 8.9)"
    assert "minutes" in str(started["note"])


def _truncate(data: bytes) -> bytes:
    return data[:-3]


def _flip_a_payload_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _plain_tensorrt_plan(data: bytes) -> bytes:
    return b"ftrt" + os.urandom(64)


def _cut_header(data: bytes) -> bytes:
    return data[:40]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, "truncated or padded"),
        (_flip_a_payload_byte, "checksum mismatch"),
        (_plain_tensorrt_plan, "no header"),
        (_cut_header, "header is cut off"),
    ],
)
def test_a_corrupt_engine_is_logged_and_rebuilt_not_fatal(
    tmp_path: Path, damage: Callable[[bytes], bytes], reason: str
) -> None:
    cache = EngineCache(tmp_path)
    path = cache.write(KEY, b"ENGINE-old", build_seconds=1.0)
    path.write_bytes(damage(path.read_bytes()))
    builder = Builder(b"ENGINE-new")
    with structlog.testing.capture_logs() as logs:
        loaded = cache.load_or_build(KEY, build=builder, deserialize=deserialize)
    assert (loaded.origin, loaded.engine) == ("built", ("engine", b"ENGINE-new"))
    assert builder.calls == 1
    invalid = [entry for entry in logs if entry["event"] == "engine_cache_invalid"]
    assert len(invalid) == 1
    assert reason in str(invalid[0]["reason"])
    assert invalid[0]["log_level"] == "warning"
    assert cache.read(KEY) == b"ENGINE-new"


def test_an_engine_built_for_another_gpu_is_rebuilt(tmp_path: Path) -> None:
    """A file copied from another host under this key's name is caught by its header."""
    cache = EngineCache(tmp_path)
    other_gpu = dataclasses.replace(KEY, gpu_name="Tesla T4", compute_capability="7.5")
    foreign = cache.write(other_gpu, b"ENGINE-t4", build_seconds=1.0)
    shutil.copyfile(foreign, cache.path_for(KEY))
    builder = Builder(b"ENGINE-l4")
    with structlog.testing.capture_logs() as logs:
        loaded = cache.load_or_build(KEY, build=builder, deserialize=deserialize)
    assert loaded.engine == ("engine", b"ENGINE-l4")
    (invalid,) = [entry for entry in logs if entry["event"] == "engine_cache_invalid"]
    assert str(invalid["reason"]) == (
        "built for another configuration: compute_capability '7.5' != '8.9', "
        "gpu_name 'Tesla T4' != 'NVIDIA L4'"
    )


def test_an_engine_tensorrt_refuses_is_rebuilt(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.write(KEY, b"garbage TensorRT cannot read", build_seconds=1.0)
    builder = Builder(b"ENGINE-fresh")
    with structlog.testing.capture_logs() as logs:
        loaded = cache.load_or_build(KEY, build=builder, deserialize=deserialize)
    assert loaded.engine == ("engine", b"ENGINE-fresh")
    assert _events(logs) == ["engine_cache_rejected", "engine_build_started", "engine_built"]
    assert logs[0]["error"] == "TensorRT could not deserialize the engine"


def test_a_failed_build_raises_and_leaves_the_cache_as_it_was(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)

    def failing_build() -> bytes:
        raise EngineBuildError("TensorRT cannot parse model.onnx: unsupported op")

    with pytest.raises(EngineBuildError, match="unsupported op"):
        cache.load_or_build(KEY, build=failing_build, deserialize=deserialize)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_still_runs_the_built_engine(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    cache = EngineCache(blocker / "engines")
    with structlog.testing.capture_logs() as logs:
        loaded = cache.load_or_build(KEY, build=Builder(b"ENGINE-1"), deserialize=deserialize)
    assert (loaded.origin, loaded.engine) == ("built", ("engine", b"ENGINE-1"))
    assert _events(logs) == [
        "engine_cache_invalid",  # unreadable: not a directory
        "engine_build_started",
        "engine_cache_write_failed",
        "engine_built",
    ]
    assert "Not a directory" in str(logs[0]["reason"])


def test_force_rebuilds_a_valid_engine(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.write(KEY, b"ENGINE-old", build_seconds=1.0)
    loaded = cache.load_or_build(
        KEY, build=Builder(b"ENGINE-new"), deserialize=deserialize, force=True
    )
    assert loaded.origin == "built"
    assert cache.read(KEY) == b"ENGINE-new"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(0.05)
    yield listener
    listener.close()


def _datagrams(listener: socket.socket) -> list[str]:
    received = []
    while True:
        try:
            received.append(listener.recv(4096).decode())
        except TimeoutError:
            return received


def test_systemd_start_timeout_is_extended_while_the_engine_builds(
    tmp_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EXTEND_TIMEOUT_USEC goes out as the build starts and then regularly until it ends."""
    monkeypatch.setattr("monitor.inference.engine_cache.BUILD_TIMEOUT_INTERVAL_S", 0.05)
    notifier = SystemdNotifier(str(tmp_path / "notify"))

    def slow_build() -> bytes:
        time.sleep(0.5)
        return b"ENGINE-1"

    EngineCache(tmp_path / "engines").load_or_build(
        KEY, build=slow_build, deserialize=deserialize, extend_timeout=notifier.extend_timeout
    )
    during = _datagrams(notify_socket)
    assert len(during) >= 4
    assert set(during) == {"EXTEND_TIMEOUT_USEC=180000000\n"}
    time.sleep(0.3)
    assert _datagrams(notify_socket) == []  # stopped with the build
    notifier.close()


def test_timeout_extension_is_not_sent_for_a_cached_engine(tmp_path: Path) -> None:
    calls: list[float] = []
    cache = EngineCache(tmp_path)
    cache.write(KEY, b"ENGINE-1", build_seconds=1.0)
    cache.load_or_build(
        KEY, build=Builder(b"unused"), deserialize=deserialize, extend_timeout=calls.append
    )
    assert calls == []
    with keep_extending_timeout(calls.append, extension_s=5.0, interval_s=1.0):
        pass
    assert calls == [5.0]


# -- choosing the backend ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "tensorrt", "expected"),
    [
        ("auto", ON_A_GPU_HOST, "tensorrt"),
        ("auto", NOT_INSTALLED, "onnxruntime"),
        ("tensorrt", ON_A_GPU_HOST, "tensorrt"),
        ("onnxruntime", ON_A_GPU_HOST, "onnxruntime"),
        ("onnxruntime", NOT_INSTALLED, "onnxruntime"),
    ],
)
def test_backend_selection(kind: str, tensorrt: TensorRTAvailability, expected: str) -> None:
    choice = select_backend(kind, tensorrt)
    assert choice.kind == expected
    if kind == "auto" and expected == "onnxruntime":
        assert choice.reason == "auto: TensorRT not usable: tensorrt is not installed (pip ...)"


def test_forcing_tensorrt_where_it_cannot_run_names_the_fix() -> None:
    with pytest.raises(BackendUnavailableError) as caught:
        select_backend("tensorrt", NOT_INSTALLED)
    assert str(caught.value) == (
        "backend.type = 'tensorrt' but TensorRT cannot run on this host: tensorrt is not "
        "installed (pip ...). Fix that, or set backend.type = 'auto' (falls back to ONNX "
        "Runtime) or 'onnxruntime'"
    )


def test_probe_says_why_tensorrt_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    missing = probe_tensorrt()
    assert (missing.available, missing.problem) == (False, "not_installed")
    assert "pip install 'crystal-monitor[tensorrt]'" in missing.reason

    newer = types.ModuleType("tensorrt")
    newer.__version__ = "11.4.0"
    monkeypatch.setitem(sys.modules, "tensorrt", newer)
    unsupported = probe_tensorrt()
    assert unsupported.problem == "unsupported_version"
    assert "pip install 'tensorrt>=10,<11'" in unsupported.reason

    supported = types.ModuleType("tensorrt")
    supported.__version__ = "10.7.0"
    monkeypatch.setitem(sys.modules, "tensorrt", supported)
    for module in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, module, None)
    no_cuda = probe_tensorrt()
    assert no_cuda.problem == "no_cuda_python"
    assert no_cuda.tensorrt_version == "10.7.0"


@pytest.mark.usefixtures("no_tensorrt")
def test_auto_falls_back_to_onnxruntime_with_its_real_results(
    model: LoadedModel, tmp_path: Path
) -> None:
    crops, labels = _crops(16)
    batch = prepare_batch(crops, model.manifest.input)
    with structlog.testing.capture_logs() as logs:
        backend = resolve_backend(BackendConfig(type="auto"), model, state_dir=tmp_path)
    reference = OnnxRuntimeBackend(model, threads=1)
    try:
        assert isinstance(backend, OnnxRuntimeBackend)
        assert backend.name == f"onnxruntime[{reference.providers[0]}]"
        rows = backend.infer(batch)
        np.testing.assert_allclose(rows, reference.infer(batch), rtol=1e-5, atol=1e-6)
    finally:
        backend.close()
        reference.close()
    probabilities = rows[:, : len(model.manifest.classes)]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    predicted = [model.manifest.classes[i] for i in probabilities.argmax(axis=1)]
    assert predicted == labels
    (selected,) = [entry for entry in logs if entry["event"] == "backend_selected"]
    assert selected["requested"] == "auto"
    assert selected["backend"] == backend.name
    assert str(selected["reason"]).startswith(
        "auto: TensorRT not usable: tensorrt is not installed"
    )
    assert not (tmp_path / "engines").exists()  # nothing was built


@pytest.mark.usefixtures("no_tensorrt")
def test_forced_tensorrt_without_it_raises_naming_the_fix(model: LoadedModel) -> None:
    with pytest.raises(BackendUnavailableError, match=r"set backend\.type = 'auto'"):
        resolve_backend("tensorrt", model)
    with pytest.raises(BackendUnavailableError, match=r"unknown backend\.type 'cuda'"):
        resolve_backend("cuda", model)


def _blocked_tensorrt_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import tensorrt` fails, even on a host that has it."""
    stub = tmp_path / "stubs" / "tensorrt"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('tensorrt blocked by the test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(stub.parent), str(REPO)])
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.pop("NOTIFY_SOCKET", None)
    return env


def _tensorrt_config(tmp_path: Path) -> Path:
    folder = tmp_path / "probe"
    folder.mkdir()
    config = tmp_path / "monitor.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
log_format = "json"

[backend]
type = "tensorrt"

[[probes]]
id = "R1"
[probes.source]
type = "folder"
path = "{folder}"
"""
    )
    return config


def test_run_with_tensorrt_forced_and_absent_exits_78_with_the_fix(tmp_path: Path) -> None:
    """Through the real CLI: `crystal-monitor run` refuses to start, and says how to fix it."""
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "run", "--config", str(_tensorrt_config(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
        env=_blocked_tensorrt_env(tmp_path),
    )
    assert result.returncode == EX_CONFIG, result.stderr
    assert (
        "config error: backend.type = 'tensorrt' but TensorRT cannot run on this host: "
        "tensorrt is not installed (pip install 'crystal-monitor[tensorrt]' on a GPU host). "
        "Fix that, or set backend.type = 'auto' (falls back to ONNX Runtime) or 'onnxruntime'"
    ) in result.stderr.splitlines()
    assert "daemon_started" not in result.stderr


def test_doctor_fails_a_config_forcing_tensorrt_on_a_host_without_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "doctor", "--config", str(_tensorrt_config(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
        env=_blocked_tensorrt_env(tmp_path),
    )
    assert result.returncode == EX_CONFIG, result.stdout
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1
    assert failed[0].startswith("FAIL  backend tensorrt: backend.type = 'tensorrt' but TensorRT")
    assert "ok    config:" in result.stdout  # the file itself is valid: validation is pure


# -- configuration ------------------------------------------------------------------------------


GOOD_PROBE = "[[probes]]\nid = 'R1'\n[probes.source]\ntype = 'folder'\npath = '/tmp'\n"


def test_backend_defaults_to_auto_with_fp16_engines_under_the_state_dir() -> None:
    probe = {"id": "R1", "source": {"type": "folder", "path": "/tmp"}}
    settings = load_settings(data={"probes": [probe]})
    assert settings.backend.type == "auto"
    assert settings.backend.tensorrt == TensorRTConfig(
        precision="fp16", calibration_dir=None, engine_cache_dir=None
    )


def test_the_printed_default_config_asks_for_auto(tmp_path: Path) -> None:
    from monitor.cli.subcommands import DEFAULT_CONFIG

    path = tmp_path / "default.toml"
    path.write_text(DEFAULT_CONFIG)
    backend = load_settings(path).backend
    assert (backend.type, backend.threads, backend.tensorrt.precision) == ("auto", 0, "fp16")
    assert backend.tensorrt.engine_cache_dir is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "[backend]\ntype = 'cuda'\n",
            "backend.type: Input should be 'auto', 'tensorrt' or 'onnxruntime'",
        ),
        (
            "[backend.tensorrt]\nprecision = 'int8'\n",
            "backend.tensorrt: precision = 'int8' needs calibration_dir (a folder of crop images)",
        ),
        ("[backend.tensorrt]\nworkspace = 4\n", "backend.tensorrt.workspace: unknown key"),
    ],
)
def test_backend_config_mistakes_name_their_key(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + GOOD_PROBE)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(problem), caught.value.problems[0]


def test_a_missing_calibration_folder_is_a_start_up_problem(tmp_path: Path) -> None:
    from monitor.config.settings import check_environment

    missing = tmp_path / "no-crops"
    settings = load_settings(
        data={
            "daemon": {"state_dir": str(tmp_path / "state")},
            "backend": {"tensorrt": {"precision": "int8", "calibration_dir": str(missing)}},
            "probes": [{"id": "R1", "source": {"type": "folder", "path": str(tmp_path)}}],
        }
    )
    assert check_environment(settings) == [
        f"backend.tensorrt.calibration_dir: folder {missing} not found "
        "(point it at a folder of crop images)"
    ]


# -- INT8 calibration data ----------------------------------------------------------------------


def _write_crops(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    crops, labels = _crops(count, seed=11)
    for index, (crop, label) in enumerate(zip(crops, labels, strict=True)):
        cv2.imwrite(str(folder / f"{label}_{index:03d}.png"), crop)
    return folder


def test_calibration_batches_are_the_daemons_own_preprocessing(
    model: LoadedModel, tmp_path: Path
) -> None:
    folder = _write_crops(tmp_path / "crops", 10)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    files = calibration_files(folder)
    assert len(files) == 11  # the ten crops and the broken PNG, not the text file
    batches = calibration_batches(files, model.manifest.input, batch_size=4)
    assert [b.shape for b in batches] == [(4, 3, 96, 96), (4, 3, 96, 96)]  # 10 -> 2 full
    images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in files if p.name != "broken.png"]
    np.testing.assert_array_equal(batches[1], prepare_batch(images[4:8], model.manifest.input))


def test_too_few_calibration_images_name_the_fix(model: LoadedModel, tmp_path: Path) -> None:
    files = calibration_files(_write_crops(tmp_path / "crops", 3))
    with pytest.raises(CalibrationError, match="at least 16 readable images, found 3"):
        calibration_batches(files, model.manifest.input)
    with pytest.raises(CalibrationError, match="calibration folder not found"):
        calibration_files(tmp_path / "nowhere")


# -- build-engine and doctor ---------------------------------------------------------------------


def test_build_engine_refuses_where_tensorrt_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_tensorrt: None
) -> None:
    code = main(["build-engine", "--precision", "fp16", "--cache-dir", str(tmp_path)])
    assert code == 69
    error = capsys.readouterr().err
    assert error.startswith("error: TensorRT cannot run on this host: tensorrt is not installed")
    assert "build the engine on the GPU host that will run it" in error
    assert list(tmp_path.iterdir()) == []


def test_build_engine_checks_its_options_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build-engine", "--precision", "int8", "--cache-dir", str(tmp_path)]) == 78
    assert "precision = 'int8' needs calibration_dir" in capsys.readouterr().err
    assert main(["build-engine"]) == 78
    assert "--config FILE" in capsys.readouterr().err
    assert main(["build-engine", "--cache-dir", str(tmp_path), "--model", str(tmp_path)]) == 78
    assert "model manifest not found" in capsys.readouterr().err


def test_doctor_reports_the_engine_cache_state(model: LoadedModel, tmp_path: Path) -> None:
    settings = TensorRTConfig()
    state = tmp_path / "state"
    missing = check_engine_cache(model, settings, ON_A_GPU_HOST, state_dir=state, max_batch=32)
    assert missing.status == "warn"
    assert missing.detail.startswith(f"no engine yet in {state / 'engines'} for fp16, batch 1-32")
    assert "crystal-monitor build-engine --config FILE" in missing.detail

    key = engine_key(model, ON_A_GPU_HOST, settings, max_batch=32)
    path = EngineCache(state / "engines").write(key, b"ENGINE", build_seconds=75.0)
    ready = check_engine_cache(model, settings, ON_A_GPU_HOST, state_dir=state, max_batch=32)
    assert ready.status == "ok"
    assert ready.detail.startswith(f"{path}: ready (fp16, batch 1-32, TensorRT 10.7.0")
    assert "in 75.0 s" in ready.detail

    path.write_bytes(path.read_bytes()[:-1])
    broken = check_engine_cache(model, settings, ON_A_GPU_HOST, state_dir=state, max_batch=32)
    assert broken.status == "warn"
    assert "unusable (truncated or padded" in broken.detail


# -- the pipelined batcher (how TensorRT overlaps the next batch with the current) ------------


class PipelinedFake:
    """A backend with submit/wait that records the order of calls (pure logic test)."""

    name = "fake-pipelined"

    def __init__(self, fail_batch: int | None = None) -> None:
        self.events: list[str] = []
        self.submitted = 0
        self.fail_batch = fail_batch

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.submit(batch).wait()

    def submit(self, batch: np.ndarray) -> FakePending:
        self.submitted += 1
        number = self.submitted
        self.events.append(f"submit {number} ({len(batch)})")
        return FakePending(self, number, batch)

    def close(self) -> None:
        pass


class FakePending:
    def __init__(self, backend: PipelinedFake, number: int, batch: np.ndarray) -> None:
        self.backend, self.number, self.batch = backend, number, batch

    def wait(self) -> np.ndarray:
        self.backend.events.append(f"wait {self.number}")
        if self.number == self.backend.fail_batch:
            raise RuntimeError("CUDA error cudaErrorLaunchFailure")
        value = self.batch[:, 0, 0, 0].astype(np.float32)
        return np.stack([value, 1 - value], axis=1)


def _run_frames(backend: PipelinedFake, frames: list[np.ndarray]) -> list[tuple[object, object]]:
    batcher = MicroBatcher(backend, max_batch=4, max_wait_s=0.01, queue_crops=64)
    results: list[tuple[object, object]] = [("pending", None)] * len(frames)
    done = threading.Event()
    remaining = [len(frames)]

    def callback(index: int) -> Callable[[np.ndarray | None, str | None], None]:
        def on_done(rows: np.ndarray | None, error: str | None) -> None:
            results[index] = (None if rows is None else rows[:, 0].tolist(), error)
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

        return on_done

    for index, frame in enumerate(frames):  # all queued before the batcher thread starts
        assert batcher.submit(frame, callback(index))
    batcher.start()
    assert done.wait(10)
    batcher.stop()
    return results


def _frame(value: float, crops: int = 4) -> np.ndarray:
    return np.full((crops, 3, 2, 2), value, np.float32)


def test_pipelined_batcher_submits_the_next_batch_before_collecting_the_current() -> None:
    backend = PipelinedFake()
    results = _run_frames(backend, [_frame(0.1), _frame(0.2), _frame(0.3), _frame(0.4)])
    assert backend.events == [
        "submit 1 (4)", "submit 2 (4)", "wait 1",
        "submit 3 (4)", "wait 2",
        "submit 4 (4)", "wait 3",
        "wait 4",
    ]  # fmt: skip
    assert [rows for rows, _ in results] == [pytest.approx([v] * 4) for v in (0.1, 0.2, 0.3, 0.4)]
    assert all(error is None for _, error in results)


def test_a_failed_pipelined_batch_fails_only_its_own_frames() -> None:
    backend = PipelinedFake(fail_batch=2)
    results = _run_frames(backend, [_frame(0.1), _frame(0.2), _frame(0.3)])
    assert results[0] == (pytest.approx([0.1] * 4), None)
    assert results[1] == (None, "inference_failed: CUDA error cudaErrorLaunchFailure")
    assert results[2] == (pytest.approx([0.3] * 4), None)


# -- `make test-gpu` fails when GPU tests skip -----------------------------------------------

GATED_MODULE = """
import pytest

@pytest.mark.gpu
def test_on_the_gpu():
    {body}

def test_elsewhere():
    pass
"""


@pytest.mark.parametrize(
    ("body", "options", "code", "line"),
    [
        (
            "pytest.skip('no CUDA GPU')",
            ["--require-gpu"],
            1,
            "gpu test skipped under --require-gpu: Skipped: no CUDA GPU",
        ),
        ("pytest.skip('no CUDA GPU')", [], 0, "1 skipped, 1 deselected"),
        ("assert 1 + 1 == 2", ["--require-gpu"], 0, "1 passed, 1 deselected"),
        (None, ["--require-gpu"], 1, "--require-gpu: no gpu test passed"),
    ],
)
def test_require_gpu_fails_a_run_that_skipped_or_ran_no_gpu_test(
    tmp_path: Path, body: str | None, options: list[str], code: int, line: str
) -> None:
    """The gate behind `make test-gpu` (`pytest -m gpu --require-gpu`), on a stand-in module."""
    module = tmp_path / "test_gated.py"
    if body is None:
        module.write_text("def test_elsewhere():\n    pass\n")
    else:
        module.write_text(GATED_MODULE.format(body=body))
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
            "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), "-m", "gpu",
            *options, str(module),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == code, result.stdout + result.stderr
    assert any(text.startswith(line) for text in result.stdout.splitlines()), result.stdout
