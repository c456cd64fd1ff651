"""`crystal-monitor build-engine`: build the TensorRT engine at deploy time, not at first start.

The engine lands in the cache the daemon reads, under the key the daemon will look for
(model, TensorRT version, GPU, precision, batch profile), so the first start loads it in
seconds instead of building for minutes. With `--config` every setting comes from the
daemon's configuration; the other options override it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from monitor.config.exit_codes import EX_CONFIG, EX_UNAVAILABLE
from monitor.config.settings import (
    BatcherConfig,
    ConfigError,
    TensorRTConfig,
    load_settings,
)
from monitor.logs import configure_logging
from monitor.manifest import ManifestError, load_manifest


def add_build_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the daemon's configuration: model, backend.tensorrt, batcher.max_batch and "
        "daemon.state_dir are taken from it",
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="exported model directory (default: shipped)"
    )
    parser.add_argument(
        "--precision", choices=["fp16", "int8"], default=None, help="engine precision (fp16)"
    )
    parser.add_argument(
        "--calibration", type=Path, default=None, help="folder of crop images for int8"
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help=f"largest batch, the daemon's batcher.max_batch ({BatcherConfig().max_batch})",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="engine cache folder (default: backend.tensorrt.engine_cache_dir or "
        "<daemon.state_dir>/engines of --config)",
    )
    parser.add_argument(
        "--force", action="store_true", help="build even when a valid engine is cached"
    )


def _fail(message: str, code: int = EX_CONFIG) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run_build_engine(args: argparse.Namespace) -> int:
    from monitor.inference.backend import BackendUnavailableError  # noqa: PLC0415
    from monitor.inference.calibration import CalibrationError  # noqa: PLC0415
    from monitor.inference.tensorrt_backend import (  # noqa: PLC0415
        EngineBuildError,
        engine_cache_dir,
        prepare_engine,
        probe_tensorrt,
    )

    model_path: Path | None = args.model
    tensorrt = TensorRTConfig()
    max_batch = BatcherConfig().max_batch
    cache_dir: Path | None = args.cache_dir
    log_level, log_format = "info", "auto"
    if args.config is not None:
        try:
            settings = load_settings(args.config)
        except ConfigError as exc:
            return _fail("; ".join(exc.problems))
        model_path = model_path or settings.model.path
        tensorrt = settings.backend.tensorrt
        max_batch = settings.batcher.max_batch
        cache_dir = cache_dir or engine_cache_dir(tensorrt, settings.daemon.state_dir)
        log_level, log_format = settings.daemon.log_level, settings.daemon.log_format
    if cache_dir is None:
        cache_dir = tensorrt.engine_cache_dir
    if cache_dir is None:
        return _fail(
            "say where the daemon looks for engines: --config FILE (its state_dir/engines) or "
            "--cache-dir DIR (e.g. /var/lib/crystal-monitor/engines)"
        )
    if args.max_batch is not None:
        if not 1 <= args.max_batch <= 1024:
            return _fail("--max-batch must be between 1 and 1024")
        max_batch = args.max_batch
    overrides = {
        "precision": args.precision or tensorrt.precision,
        "calibration_dir": args.calibration or tensorrt.calibration_dir,
    }
    try:
        tensorrt = TensorRTConfig.model_validate({**tensorrt.model_dump(), **overrides})
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
        return _fail(f"{problem} (--calibration DIR)")
    try:
        model = load_manifest(model_path)
    except ManifestError as exc:
        return _fail(str(exc))
    availability = probe_tensorrt()
    if not availability.available:
        return _fail(
            f"TensorRT cannot run on this host: {availability.reason} (build the engine on "
            "the GPU host that will run it: engines are specific to GPU and TensorRT version)",
            EX_UNAVAILABLE,
        )
    configure_logging(log_level, log_format)  # the build logs its start, end and cache state
    try:
        loaded = prepare_engine(
            model,
            tensorrt,
            max_batch=max_batch,
            cache_dir=cache_dir,
            availability=availability,
            force=args.force,
        )
    except (BackendUnavailableError, CalibrationError) as exc:
        return _fail(str(exc))
    except EngineBuildError as exc:
        return _fail(str(exc), 1)
    verb = "loaded from cache" if loaded.origin == "cache" else "built"
    print(
        f"engine {verb} in {loaded.seconds:.1f} s: {loaded.path}\n"
        f"  model {model.manifest.name} {model.manifest.version}; {tensorrt.precision}, "
        f"batch 1-{max_batch}; {availability.reason}"
    )
    return 0
