"""Daemon-side commands: run, demo, validate-config, print-default-config, export."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
import tomllib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from monitor.config.durations import parse_duration
from monitor.config.settings import (
    EX_CONFIG,
    ConfigError,
    FolderSourceConfig,
    Settings,
    check_environment,
    check_sections_environment,
    load_settings,
)
from monitor.config.template import render_default_config
from monitor.logs import configure_logging, restore_stderr
from monitor.manifest import ModelIdentity
from monitor.store import Store, StoreError
from monitor.timestamps import iso_utc
from monitor.wire import to_wire

EX_DATAERR = 65  # sysexits: the input data (here the store file) was incorrect

DEFAULT_CONFIG = render_default_config()  # every key, from the settings models


def _load_or_report(path: Path | None, data: dict[str, Any] | None = None) -> Settings | None:
    try:
        settings = load_settings(path, data)
    except ConfigError as exc:
        # The files the valid sections name are checked too: every error in one pass.
        problems = [*exc.problems, *check_sections_environment(exc.sections)]
        for problem in problems:
            print(f"config error: {problem}", file=sys.stderr)
        return None
    problems = check_environment(settings)
    for problem in problems:
        print(f"config error: {problem}", file=sys.stderr)
    return None if problems else settings


def run_validate_config(args: argparse.Namespace) -> int:
    settings = _load_or_report(args.config)
    if settings is None:
        return EX_CONFIG
    print(f"{args.config}: valid ({len(settings.probes)} probe(s))")
    return 0


def run_print_default_config(args: argparse.Namespace) -> int:
    sys.stdout.write(DEFAULT_CONFIG)
    return 0


def run_run(args: argparse.Namespace) -> int:
    settings = _load_or_report(args.config)
    if settings is None:
        return EX_CONFIG
    from monitor.cli.service import run_daemon  # noqa: PLC0415
    from monitor.inference.backend import BackendUnavailableError  # noqa: PLC0415

    # The daemon's stderr is its log: native libraries' lines and uncaught exceptions
    # become JSON events too (with log_format json).
    configure_logging(settings.daemon.log_level, settings.daemon.log_format, capture_stderr=True)
    try:
        return run_daemon(settings, args.config)
    except BackendUnavailableError as exc:
        # A forced backend this host cannot run is a configuration error: exit 78, which
        # the systemd units do not restart (RestartPreventExitStatus=78). The fix is for
        # a person: one plain line, as for every other configuration error.
        restore_stderr()
        print(f"config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StoreError as exc:
        return _report_store_error(exc)


def _report_store_error(exc: StoreError) -> int:
    """A damaged store: restarting cannot fix it, so exit 65, which the units do not
    restart either (RestartPreventExitStatus=65 78)."""
    structlog.get_logger(__name__).error("store_unusable", error=str(exc))
    restore_stderr()  # the plain line below says what to do, as a config error does
    print(f"error: {exc}", file=sys.stderr)
    return EX_DATAERR


DEMO_RETENTION = "1h"  # the demo's store: an hour of frames and windows, then purged


def demo_settings(
    state_dir: Path, mqtt_port: int = 1883, opcua_port: int = 4840, http_port: int = 8080
) -> dict[str, Any]:
    """The built-in demo: a simulated probe writing frames into a folder the daemon watches,
    publishing to a local MQTT broker, serving OPC UA on loopback without security and the
    dashboard on loopback without a token. The store keeps an hour (the dashboard's trend):
    `make run` must not fill the disk."""
    alarms = tomllib.loads(DEFAULT_CONFIG)["alarms"]
    return {
        "alarms": alarms,
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": mqtt_port, "commands": True},
        "opcua": {
            "enabled": True,
            "security_profile": "demo",
            "endpoint": f"opc.tcp://127.0.0.1:{opcua_port}/crystal-monitor",
        },
        "http": {"enabled": True, "host": "127.0.0.1", "port": http_port},
        "daemon": {"state_dir": str(state_dir), "shutdown_grace": "5s"},
        "aggregation": {"publish_interval": "5s"},
        "store": {"retention": DEMO_RETENTION},
        "probes": [
            {
                "id": "demo",
                "sampling": "particles",
                "source": {
                    "type": "folder",
                    "path": str(state_dir / "probe-demo"),
                    # Frames written while the daemon starts are taken; a leftover folder
                    # from an earlier demo is not replayed.
                    "backlog": "newest:30",
                },
            }
        ],
    }


def run_demo(args: argparse.Namespace) -> int:
    from monitor.cli.demo_folder import RecordedFramePruner  # noqa: PLC0415
    from monitor.cli.service import run_daemon  # noqa: PLC0415

    state_dir: Path = args.state_dir
    settings = _load_or_report(
        None, demo_settings(state_dir, args.mqtt_port, args.opcua_port, args.http_port)
    )
    if settings is None:
        return EX_CONFIG
    configure_logging(settings.daemon.log_level, settings.daemon.log_format)
    incoming = state_dir / "probe-demo"
    incoming.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    writer = threading.Thread(
        target=_write_demo_frames,
        args=(incoming, args.fps, args.profile, stop),
        name="demo-probe",
        daemon=True,
    )
    writer.start()
    probe = settings.probes[0]
    assert isinstance(probe.source, FolderSourceConfig)
    pruner = RecordedFramePruner(
        incoming, state_dir, probe.id, probe.source.patterns, keep_s=args.keep_frames
    )
    pruner.start()
    print(
        f"demo: a simulated probe writes {args.fps:g} frames/s into {incoming} "
        f"(PG share {args.profile});\n"
        f"      recorded frames are deleted from there after {args.keep_frames:g} s, "
        f"the store keeps {DEMO_RETENTION};\n"
        f"      state in {state_dir}; watch the windows with\n"
        f"      crystal-monitor export --state-dir {state_dir} --what windows\n"
        f"      MQTT: mosquitto_sub -p {args.mqtt_port} -t 'crystal-monitor/#' -v\n"
        f"      OPC UA: opc.tcp://127.0.0.1:{args.opcua_port}/crystal-monitor (demo profile)\n"
        f"      dashboard: http://127.0.0.1:{args.http_port}/  (metrics: /metrics)\n"
        f"      Ctrl-C stops.",
        file=sys.stderr,
    )
    try:
        return run_daemon(settings)
    except StoreError as exc:
        return _report_store_error(exc)
    finally:
        stop.set()
        writer.join(timeout=10)  # never exit with the renderer inside OpenCV
        pruner.stop()


def _write_demo_frames(outdir: Path, fps: float, profile: str, stop: threading.Event) -> None:
    """The demo probe: frames written the way vendor software does (temporary name, rename)."""
    import time  # noqa: PLC0415

    from monitor.simulator import FrameConfig, FrameSimulator, parse_profile  # noqa: PLC0415
    from monitor.simulator.writer import image_file_name, write_png_atomically  # noqa: PLC0415

    simulator = FrameSimulator(FrameConfig(profile=parse_profile(profile)), seed=1)
    started = time.monotonic()
    sequence = 0
    while not stop.is_set():
        elapsed = time.monotonic() - started
        image, _ = simulator.render(elapsed)
        name = image_file_name(datetime.now(UTC), sequence)
        write_png_atomically(outdir / name, image)
        sequence += 1
        stop.wait(max(0.0, started + sequence / fps - time.monotonic()))


def _duration_argument(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _window_rows(store: Store, since: float) -> list[dict[str, Any]]:
    rows = []
    for probe, ts, batch, snapshot in store.iter_snapshots(since):
        trend = snapshot.get("trend", {})
        for window, stats in snapshot["windows"].items():
            sizes = stats.get("sizes") or {}  # none in snapshots stored before issue 15
            for name, cls in stats["classes"].items():
                ci = cls.get("ci95") or [None, None]
                size = sizes.get("classes", {}).get(name, {})
                rows.append(
                    {
                        "ts": iso_utc(ts),
                        "probe": probe,
                        "batch": batch,
                        "window_s": int(window),
                        "class": name,
                        "n": cls["n"],
                        "fraction": cls["fraction"],
                        "ci95_low": ci[0],
                        "ci95_high": ci[1],
                        "adjusted": cls["adjusted"],
                        "ewma": trend.get(name, {}).get("ewma"),
                        "slope_per_min": trend.get(name, {}).get("slope_per_min"),
                        "n_total": stats["n"],
                        "n_uncertain": stats["n_uncertain"],
                        "n_ood": stats.get("n_ood", 0),
                        "frames": stats["frames"],
                        "rejected_frames": stats["rejected_frames"],
                        "particles_per_min": stats["particles_per_min"],
                        "frames_per_min": stats["frames_per_min"],
                        "models": _model_labels(stats.get("models")),
                        "spans_model_swap": stats.get("spans_model_swap", False),
                        "size_count": size.get("count"),
                        "d10": size.get("d10"),
                        "d50": size.get("d50"),
                        "d90": size.get("d90"),
                        "d50_sq": size.get("d50_sq"),
                        "mean_aspect_ratio": size.get("mean_aspect_ratio"),
                        "size_unit": sizes.get("unit"),
                    }
                )
    return rows


def _model_labels(models: list[dict[str, str]] | None) -> str | None:
    """A window's models as one cell: "name:version:sha12", a swap joined by " -> "."""
    if not models:
        return None  # a snapshot stored before models were recorded
    return " -> ".join(ModelIdentity(**model).label for model in models)


def _frame_rows(store: Store, since: float) -> list[dict[str, Any]]:
    return [
        {
            "ts": iso_utc(row.ts),
            "probe": row.probe,
            "key": row.key,
            "batch": row.batch,
            "status": row.status,
            "reason": row.reason,
            **{f"n_{name}": count for name, count in row.counts.items()},
            "n_uncertain": row.n_uncertain,
            "n_ood": row.n_ood,
            "model_name": row.model["name"] if row.model else None,
            "model_version": row.model["version"] if row.model else None,
            "model_sha256": row.model["sha256"] if row.model else None,
        }
        for row in store.iter_frames(since)
    ]


PARTICLE_FIELDS = (
    "ts",
    "probe",
    "key",
    "batch",
    "class",
    "status",
    "reason",
    "confidence",
    "x",
    "y",
    "w",
    "h",
    "area",
    "ecd",
    "feret_max",
    "feret_min",
    "aspect_ratio",
    "unit",
)


def _particle_rows(store: Store, since: float) -> Iterator[dict[str, Any]]:
    """One row per stored particle (`PARTICLE_FIELDS`): its frame, the model's call and
    its size. Lengths in `unit` ("um", or "px" for a probe without pixel_size_um), the
    area in unit²; the size columns are empty for a particle without a mask (tiles).
    Streamed: a long retention holds more particles than fit in memory."""
    for stored in store.iter_particles(since):
        particle, size = stored.particle, stored.particle.size
        x, y, w, h = particle.box
        yield dict(
            zip(
                PARTICLE_FIELDS,
                (
                    iso_utc(stored.ts),
                    stored.probe,
                    stored.key,
                    stored.batch,
                    particle.label,
                    particle.status,
                    particle.reason,
                    particle.confidence,
                    x,
                    y,
                    w,
                    h,
                    *(
                        (None,) * 6
                        if size is None
                        else (
                            size.area,
                            size.ecd,
                            size.feret_max,
                            size.feret_min,
                            size.aspect_ratio,
                            size.unit,
                        )
                    ),
                ),
                strict=True,
            )
        )


_EXPORTS: dict[str, Callable[[Store, float], Iterable[dict[str, Any]]]] = {
    "windows": _window_rows,
    "frames": _frame_rows,
    "particles": _particle_rows,
}


def _parse_since(text: str | None) -> float:
    if not text:
        return 0.0
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def run_export(args: argparse.Namespace) -> int:
    if args.state_dir is not None:
        state_dir = args.state_dir
    else:
        settings = _load_or_report(args.config)
        if settings is None:
            return EX_CONFIG
        state_dir = settings.daemon.state_dir
    try:
        since = _parse_since(args.since)
    except ValueError:
        print(f"error: --since {args.since!r} is not an ISO 8601 time", file=sys.stderr)
        return 64
    try:
        store = Store(state_dir, readonly=True)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 66
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_DATAERR
    try:
        if args.what == "particles":  # streamed, with a fixed header
            _write_rows(_particle_rows(store, since), args.format, list(PARTICLE_FIELDS))
            return 0
        rows = list(_EXPORTS[args.what](store, since))
    finally:
        store.close()
    if rows:
        _write_rows(iter(rows), args.format, list(dict.fromkeys(k for row in rows for k in row)))
    return 0


def _write_rows(rows: Iterator[dict[str, Any]], form: str, fields: list[str]) -> None:
    """CSV (a header, then only when there is a row) or JSON lines, the numbers as every
    other output rounds them."""
    writer: csv.DictWriter[str] | None = None
    for row in rows:
        wire = to_wire(row)
        if form == "jsonl":
            sys.stdout.write(json.dumps(wire) + "\n")
            continue
        if writer is None:
            writer = csv.DictWriter(sys.stdout, fieldnames=fields)
            writer.writeheader()
        writer.writerow(wire)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("run", help="run the daemon in the foreground")
    parser.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    parser.set_defaults(runner=run_run)

    parser = sub.add_parser("demo", help="run the daemon on its built-in demo configuration")
    parser.add_argument("--state-dir", type=Path, default=Path(".state"), help="state folder")
    parser.add_argument("--fps", type=float, default=3.0, help="simulated probe frame rate")
    parser.add_argument(
        "--profile",
        default="ramp:0:0.3@30-330",
        help="PG share over time since start (see `simulate --help`)",
    )
    parser.add_argument("--mqtt-port", type=int, default=1883, help="local MQTT broker port")
    parser.add_argument("--opcua-port", type=int, default=4840, help="OPC UA port (loopback)")
    parser.add_argument(
        "--http-port", type=int, default=8080, help="dashboard and metrics port (loopback)"
    )
    parser.add_argument(
        "--keep-frames",
        type=_duration_argument,
        default="1m",
        help="delete frames from the probe folder once recorded and older than this",
    )
    parser.set_defaults(runner=run_demo)

    parser = sub.add_parser("validate-config", help="check a configuration file (exit 78 if bad)")
    parser.add_argument("config", type=Path)
    parser.set_defaults(runner=run_validate_config)

    parser = sub.add_parser("print-default-config", help="print a commented example config")
    parser.set_defaults(runner=run_print_default_config)

    parser = sub.add_parser("export", help="read windows, frames or particles back from the store")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the daemon's configuration file")
    source.add_argument("--state-dir", type=Path, help="or the state folder directly")
    parser.add_argument(
        "--what",
        choices=list(_EXPORTS),
        default="windows",
        help="windows: a row per window and class; frames: a row per frame; particles: a"
        " row per particle (its call, box and size)",
    )
    parser.add_argument("--since", help="ISO 8601 time, e.g. 2026-11-22T08:00:00Z")
    parser.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    parser.set_defaults(runner=run_export)

    from monitor.replay.command import add_replay_arguments, run_replay_command  # noqa: PLC0415

    parser = sub.add_parser(
        "replay", help="run a recorded batch through the pipeline and alarms; write a report"
    )
    add_replay_arguments(parser)
    parser.set_defaults(runner=run_replay_command)
