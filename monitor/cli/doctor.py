"""`crystal-monitor doctor`: what this host can run, and what a config needs that is missing.

Each check becomes one `Check` (status, what, detail); the probes that gather them touch
the host (imports, `nvidia-smi`, sockets, folders, free space), while formatting, the
free-space verdict and the exit code are plain functions over checks and numbers. Only a
`FAIL` makes the exit code non-zero, and a `FAIL` is reserved for something the
configuration needs: an optional accelerator that is absent, or an MQTT broker that is
down (the daemon queues messages in its outbox), is a `warn`.

Exit code, as `run` would exit at start-up: 0 when nothing failed; 69 (EX_UNAVAILABLE)
when every failure is a port the daemon would listen on that cannot be bound (in use,
often by a running daemon: restarting later may succeed); 78 (EX_CONFIG) when any other
check failed, as `validate-config`. Free space is checked on the filesystems of
`daemon.state_dir` and of each folder probe: FAIL under 100 MB, warn under 1 GB.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from monitor.config.exit_codes import EX_CONFIG, EX_UNAVAILABLE
from monitor.config.settings import (
    BackendConfig,
    BatcherConfig,
    ConfigError,
    DaemonConfig,
    FolderSourceConfig,
    Settings,
    TensorRTConfig,
    check_environment,
    load_settings,
)
from monitor.config.startup_error import describe_bind_error

if TYPE_CHECKING:
    from monitor.inference.tensorrt_backend import TensorRTAvailability
    from monitor.manifest import LoadedModel

Status = Literal["ok", "warn", "FAIL"]

MQTT_CONNECT_TIMEOUT_S = 2.0
NVIDIA_SMI_TIMEOUT_S = 10.0
TENSORRT_MISSING = "not installed (pip install 'crystal-monitor[tensorrt]' on a GPU host)"
# Free space under which the store, the engine cache and the probe's files are at risk
# (FAIL), and under which a few days of frames and snapshots may not fit (warn).
FREE_SPACE_FAIL_BYTES = 100 * 10**6
FREE_SPACE_WARN_BYTES = 10**9


@dataclass(frozen=True)
class Check:
    """One line of the report: `FAIL` means the configuration cannot run as written.

    `fail_code` is the exit code a FAIL stands for: EX_UNAVAILABLE for a port that
    cannot be bound now, EX_CONFIG for everything else."""

    status: Status
    what: str
    detail: str
    fail_code: int = EX_CONFIG


def format_check(check: Check) -> str:
    return f"{check.status:<4}  {check.what}: {check.detail}"


def exit_code(checks: Iterable[Check]) -> int:
    """0 when no check failed; EX_UNAVAILABLE (69) when only ports that cannot be bound
    failed; EX_CONFIG (78, as `validate-config`) when anything else failed."""
    codes = {check.fail_code for check in checks if check.status == "FAIL"}
    if not codes:
        return 0
    return EX_CONFIG if EX_CONFIG in codes else EX_UNAVAILABLE


def check_python() -> Check:
    return Check("ok", "python", f"{platform.python_version()} ({sys.executable})")


def check_package(module: str, distribution: str, *, label: str | None = None) -> Check:
    """A package the daemon imports: missing or broken is a FAIL naming the install."""
    what = label or module
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        return Check("FAIL", what, f"cannot import {module} ({exc}); pip install {distribution}")
    return Check("ok", what, str(getattr(imported, "__version__", "unknown version")))


def check_onnxruntime_providers() -> list[Check]:
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError:
        return []  # check_package already reports it
    providers = list(onnxruntime.get_available_providers())
    checks = [Check("ok", "onnxruntime providers", ", ".join(providers))]
    if "CUDAExecutionProvider" in providers:
        checks.append(Check("ok", "onnxruntime CUDA", "CUDAExecutionProvider available"))
    else:
        checks.append(
            Check(
                "warn",
                "onnxruntime CUDA",
                "CUDAExecutionProvider not available: this is the CPU build of onnxruntime "
                "(on a GPU host: pip uninstall onnxruntime && pip install onnxruntime-gpu); "
                "inference runs on CPU",
            )
        )
    return checks


def check_tensorrt(*, gpu_present: bool = False) -> Check:
    """Can the TensorRT backend run here, and if not, why (`gpu_present`: nvidia-smi saw one)."""
    from monitor.inference.tensorrt_backend import probe_tensorrt  # noqa: PLC0415

    availability = probe_tensorrt()
    if availability.available:
        return Check("ok", "tensorrt", f"{availability.reason}; backend 'auto' uses TensorRT")
    if availability.problem == "not_installed":
        if gpu_present:
            return Check(
                "warn",
                "tensorrt",
                f"GPU present but tensorrt {TENSORRT_MISSING}; backend 'auto' uses ONNX Runtime",
            )
        return Check("warn", "tensorrt", TENSORRT_MISSING)
    return Check("warn", "tensorrt", f"{availability.reason}; backend 'auto' uses ONNX Runtime")


def check_gpu() -> Check:
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return Check("warn", "gpu", "no NVIDIA GPU found (nvidia-smi not on PATH)")
    try:
        result = subprocess.run(
            [
                nvidia_smi,
                "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("warn", "gpu", f"nvidia-smi failed: {exc}")
    output = result.stdout.strip()
    if result.returncode != 0 or not output:
        reason = (result.stderr or result.stdout).strip().splitlines()
        return Check(
            "warn", "gpu", f"no NVIDIA GPU found (nvidia-smi: {reason[0] if reason else 'no GPU'})"
        )
    return Check("ok", "gpu", "; ".join(line.strip() for line in output.splitlines()))


def check_model_and_backend(
    model_path: Path | None,
    backend: BackendConfig | str,
    *,
    state_dir: Path | None = None,
    max_batch: int | None = None,
) -> list[Check]:
    """Load the manifest (sha256 verified), pick the backend as the daemon would and try it.

    ONNX Runtime is loaded on the model. TensorRT is not built here (that takes minutes):
    its engine cache is checked instead.
    """
    from monitor.inference.backend import BackendUnavailableError  # noqa: PLC0415
    from monitor.inference.factory import as_backend_config, select_backend  # noqa: PLC0415
    from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend  # noqa: PLC0415
    from monitor.inference.tensorrt_backend import probe_tensorrt  # noqa: PLC0415
    from monitor.manifest import (  # noqa: PLC0415
        ManifestError,
        describe_model_quality,
        format_model_quality,
        load_manifest,
    )

    source = str(model_path) if model_path is not None else "shipped default"
    try:
        model = load_manifest(model_path)
    except ManifestError as exc:
        return [Check("FAIL", "model", f"{exc} [{source}]")]
    manifest = model.manifest
    checks = [
        Check(
            "ok",
            "model",
            f"{manifest.name} {manifest.version} ({source}, {model.directory}); "
            f"classes {', '.join(manifest.classes)}; sha256 verified",
        ),
        Check(
            "warn" if describe_model_quality(manifest)["warnings"] else "ok",
            "model quality",
            format_model_quality(manifest),
        ),
    ]
    try:
        config = as_backend_config(backend)
    except BackendUnavailableError as exc:
        return [*checks, Check("FAIL", f"backend {backend}", str(exc))]
    backend_type = config.type
    availability = probe_tensorrt() if backend_type != "onnxruntime" else None
    try:
        choice = select_backend(backend_type, availability)
    except BackendUnavailableError as exc:
        return [*checks, Check("FAIL", f"backend {backend_type}", str(exc))]
    if choice.kind == "tensorrt":
        assert availability is not None
        checks.append(Check("ok", f"backend {backend_type}", f"TensorRT ({choice.reason})"))
        checks.append(
            check_engine_cache(
                model,
                config.tensorrt,
                availability,
                state_dir=state_dir or DaemonConfig().state_dir,
                max_batch=max_batch or BatcherConfig().max_batch,
            )
        )
        return checks
    note = "" if backend_type == "onnxruntime" else f" ({choice.reason})"
    try:
        loaded = OnnxRuntimeBackend(model, threads=1)
    except ImportError as exc:
        checks.append(Check("FAIL", f"backend {backend_type}", str(exc)))
    except Exception as exc:  # a runtime refusing the model: report it, do not crash
        checks.append(Check("FAIL", f"backend {backend_type}", f"cannot load the model: {exc}"))
    else:
        checks.append(
            Check("ok", f"backend {backend_type}", f"{loaded.name} loads the model{note}")
        )
        loaded.close()
    return checks


def check_engine_cache(
    model: LoadedModel,
    settings: TensorRTConfig,
    availability: TensorRTAvailability,
    *,
    state_dir: Path,
    max_batch: int,
) -> Check:
    """Is the engine this model, GPU and configuration need already built?"""
    from monitor.inference.calibration import (  # noqa: PLC0415
        CalibrationError,
        calibration_files,
    )
    from monitor.inference.engine_cache import EngineCache  # noqa: PLC0415
    from monitor.inference.tensorrt_backend import engine_cache_dir, engine_key  # noqa: PLC0415

    directory = engine_cache_dir(settings, state_dir)
    try:
        files = (
            calibration_files(settings.calibration_dir)
            if settings.precision == "int8" and settings.calibration_dir is not None
            else None
        )
    except CalibrationError as exc:
        return Check("FAIL", "engine cache", str(exc))
    key = engine_key(model, availability, settings, max_batch=max_batch, calibration=files)
    status = EngineCache(directory).inspect(key)
    if status.state == "valid":
        return Check("ok", "engine cache", f"{status.path}: ready ({status.detail})")
    build = "`crystal-monitor build-engine --config FILE` builds it now"
    if status.state == "invalid":
        return Check(
            "warn",
            "engine cache",
            f"{status.path}: unusable ({status.detail}); the daemon rebuilds it at start "
            f"(minutes); {build}",
        )
    return Check(
        "warn",
        "engine cache",
        f"no engine yet in {directory} for {key.describe()}: the daemon builds one at its "
        f"first start (can take minutes); {build}",
    )


def check_folder_probes(settings: Settings) -> list[Check]:
    checks = []
    for index, probe in enumerate(settings.probes):
        source = probe.source
        what = f"probes[{index}] {probe.id}"
        if not isinstance(source, FolderSourceConfig):
            checks.append(Check("ok", what, f"{source.type} source (not probed)"))
            continue
        folder = source.path
        needs_write = source.after in {"move", "delete"}
        if not folder.is_dir():
            checks.append(
                Check(
                    "FAIL",
                    what,
                    f"folder {folder} not found (create it or fix probes[{index}].source.path)",
                )
            )
        elif not os.access(folder, os.R_OK | os.X_OK):
            checks.append(Check("FAIL", what, f"folder {folder} not readable by user {_user()}"))
        elif needs_write and not os.access(folder, os.W_OK):
            checks.append(
                Check(
                    "FAIL",
                    what,
                    f"folder {folder} not writable by user {_user()}, needed for "
                    f"after = {source.after!r} (under systemd also add ReadWritePaths=)",
                )
            )
        else:
            access = "readable and writable" if needs_write else "readable"
            checks.append(Check("ok", what, f"folder {folder} {access}"))
    return checks


def check_state_dir(state_dir: Path) -> Check:
    existing = next((p for p in (state_dir, *state_dir.parents) if p.exists()), None)
    if existing is not None and os.access(existing, os.W_OK | os.X_OK):
        note = "writable" if existing == state_dir else f"will be created under {existing}"
        return Check("ok", "daemon.state_dir", f"{state_dir} {note}")
    return Check(
        "FAIL",
        "daemon.state_dir",
        f"{state_dir} cannot be created or written by user {_user()} "
        "(under systemd StateDirectory= provides it)",
    )


def check_mqtt_broker(host: str, port: int) -> Check:
    what = f"mqtt broker {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=MQTT_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        return Check(
            "warn",
            what,
            f"unreachable ({exc}); the daemon queues messages in its outbox and reconnects",
        )
    return Check("ok", what, "reachable (TCP)")


def check_opcua_port(endpoint: str) -> Check:
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "0.0.0.0", parsed.port or 4840
    what = f"opcua endpoint {host}:{port}"
    return check_listen_port(what, host, port, key="opcua.endpoint", host_key="opcua.endpoint")


def check_http_port(host: str, port: int) -> Check:
    return check_listen_port(
        f"http {host}:{port}", host, port, key="http.port", host_key="http.host"
    )


def check_listen_port(what: str, host: str, port: int, *, key: str, host_key: str) -> Check:
    """Bind `host:port` as the daemon's listener would (SO_REUSEADDR, so a port left in
    TIME_WAIT counts as free); a FAIL with exit code 69 and the fix when it cannot."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return Check("FAIL", what, f"cannot resolve {host!r}: {exc} (fix {host_key})")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            named, problem = describe_bind_error(
                exc, host=host, port=port, key=key, host_key=host_key
            )
            return Check("FAIL", what, f"{named}: {problem}", fail_code=EX_UNAVAILABLE)
    return Check("ok", what, "port free to bind")


def free_space_status(free_bytes: int) -> Status:
    """FAIL under FREE_SPACE_FAIL_BYTES, warn under FREE_SPACE_WARN_BYTES, else ok."""
    if free_bytes < FREE_SPACE_FAIL_BYTES:
        return "FAIL"
    if free_bytes < FREE_SPACE_WARN_BYTES:
        return "warn"
    return "ok"


def describe_free_space(free_bytes: int, total_bytes: int, where: str, keys: Sequence[str]) -> str:
    """The report line's detail; below the thresholds it says what fills up and the fix."""
    detail = (
        f"{_gigabytes(free_bytes)} free of {_gigabytes(total_bytes)} on the filesystem of "
        f"{where} ({', '.join(keys)})"
    )
    status = free_space_status(free_bytes)
    if status == "FAIL":
        return (
            f"{detail}: the store and the probe's files cannot grow; free space or move "
            f"{keys[0]} (at least {_gigabytes(FREE_SPACE_WARN_BYTES)} recommended)"
        )
    if status == "warn":
        return f"{detail}: under {_gigabytes(FREE_SPACE_WARN_BYTES)}; free space soon"
    return detail


def _gigabytes(size: int) -> str:
    return f"{size / 10**9:.2f} GB"


def check_free_space(places: Sequence[tuple[str, Path]]) -> list[Check]:
    """One check per filesystem holding one of `places` ((key, path)); a path not yet
    created counts by the nearest folder above it that exists."""
    by_device: dict[int, tuple[Path, list[str]]] = {}
    checks = []
    for key, path in places:
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None:
            continue
        try:
            device = existing.stat().st_dev
        except OSError as exc:
            checks.append(Check("warn", "free space", f"cannot stat {existing} ({key}): {exc}"))
            continue
        by_device.setdefault(device, (existing, []))[1].append(key)
    for where, keys in by_device.values():
        try:
            usage = shutil.disk_usage(where)
        except OSError as exc:
            checks.append(Check("warn", "free space", f"cannot read {where} ({keys[0]}): {exc}"))
            continue
        checks.append(
            Check(
                free_space_status(usage.free),
                "free space",
                describe_free_space(usage.free, usage.total, str(where), keys),
            )
        )
    return checks


def _user() -> str:
    try:
        import pwd  # noqa: PLC0415

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def run_checks(config: Path | None) -> list[Check]:
    """Every check for this host and, when given, the configuration file."""
    checks = [
        check_python(),
        check_package("numpy", "numpy"),
        check_package("onnxruntime", "onnxruntime"),
        check_package("cv2", "opencv-python-headless", label="opencv"),
        *check_onnxruntime_providers(),
    ]
    gpu = check_gpu()
    checks += [
        check_tensorrt(gpu_present=gpu.status == "ok"),
        gpu,
    ]
    if config is None:
        return [*checks, *check_model_and_backend(None, "auto")]
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        return [*checks, *(Check("FAIL", "config", problem) for problem in exc.problems)]
    problems = check_environment(settings)
    checks += [Check("FAIL", "config", problem) for problem in problems]
    if not problems:
        checks.append(Check("ok", "config", f"{config}: valid ({len(settings.probes)} probe(s))"))
    checks += check_model_and_backend(
        settings.model.path,
        settings.backend,
        state_dir=settings.daemon.state_dir,
        max_batch=settings.batcher.max_batch,
    )
    checks += check_folder_probes(settings)
    checks.append(check_state_dir(settings.daemon.state_dir))
    places = [("daemon.state_dir", settings.daemon.state_dir)]
    places += [
        (f"probes[{index}].source.path", probe.source.path)
        for index, probe in enumerate(settings.probes)
        if isinstance(probe.source, FolderSourceConfig)
    ]
    checks += check_free_space(places)
    if settings.mqtt.enabled:
        checks.append(check_mqtt_broker(settings.mqtt.host, settings.mqtt.port))
    if settings.opcua.enabled:
        checks.append(check_opcua_port(settings.opcua.endpoint))
    if settings.http.enabled:
        checks.append(check_http_port(settings.http.host, settings.http.port))
    return checks


def print_report(checks: Sequence[Check]) -> None:
    for check in checks:
        print(format_check(check))
    failed = sum(check.status == "FAIL" for check in checks)
    warned = sum(check.status == "warn" for check in checks)
    print(f"{failed} failed, {warned} warning(s), {len(checks)} checks")


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="also check this configuration file"
    )


def run_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args.config)
    print_report(checks)
    return exit_code(checks)
