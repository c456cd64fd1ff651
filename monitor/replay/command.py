"""`crystal-monitor replay FOLDER --config FILE --report report.html`: the command line
around `runner.replay_frames`, its progress line, summary and exit codes."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from monitor.config.settings import (
    EX_CONFIG,
    ConfigError,
    Settings,
    check_environment,
    load_settings,
)
from monitor.logs import configure_logging
from monitor.replay.report import batch_time, clock_text, duration_text, render_report
from monitor.replay.result import EX_CANTCREAT, EX_USAGE, ReplayError, ReplayResult
from monitor.replay.runner import (
    find_recorded_frames,
    frame_patterns,
    replay_frames,
    replay_settings,
)


def _speed(text: str) -> float | None:
    if text.strip().lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a factor such as 50 or 'max', got {text!r}"
        ) from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be > 0 or 'max', got {text!r}")
    return value


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `replay` options to a (sub)parser."""
    parser.add_argument("folder", type=Path, help="folder of recorded probe frames")
    parser.add_argument(
        "--config", type=Path, required=True, help="the daemon's TOML configuration file"
    )
    parser.add_argument(
        "--report", type=Path, required=True, help="HTML report to write (one self-contained file)"
    )
    parser.add_argument(
        "--probe",
        help="probe id whose sampling, quality gate and alarms apply (default: the first probe)",
    )
    parser.add_argument(
        "--speed",
        type=_speed,
        default=None,
        metavar="N|max",
        help="feed at N x recorded time, e.g. 50 to leave CPU to a live daemon on this host; "
        "'max' (the default) runs as fast as the host allows. The result does not depend on it",
    )
    parser.add_argument(
        "--recursive",
        action="store_true",
        default=None,
        help="also take frames from sub-folders (default: the probe source's `recursive`)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="warning",
        help="daemon log lines on stderr (default: warning)",
    )


def _load_settings(path: Path) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise ReplayError(
            "\n".join(f"config error: {problem}" for problem in exc.problems), EX_CONFIG
        ) from exc


def _check_report_path(report: Path) -> None:
    parent = report.parent if str(report.parent) else Path(".")
    if report.is_dir():
        raise ReplayError(f"--report {report} is a folder; name the HTML file", EX_CANTCREAT)
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ReplayError(
            f"cannot write the report {report}: folder {parent} is missing or not writable",
            EX_CANTCREAT,
        )


def run_replay_command(args: argparse.Namespace) -> int:
    """The `replay` command: exit 0, 78 (configuration), 64, 66 or 73 with a message."""
    try:
        return _run(args)
    except ReplayError as exc:
        message = str(exc)
        prefix = "" if message.startswith("config error:") else "replay: error: "
        print(f"{prefix}{message}", file=sys.stderr)
        return exc.exit_code


def _run(args: argparse.Namespace) -> int:
    settings = _load_settings(args.config)
    probe_ids = [p.id for p in settings.probes]
    probe_id = args.probe or probe_ids[0]
    if probe_id not in probe_ids:
        raise ReplayError(
            f"--probe {probe_id!r} is not in {args.config} (probes: {', '.join(probe_ids)})",
            EX_USAGE,
        )
    probe = settings.probes[probe_ids.index(probe_id)]
    patterns, recursive = frame_patterns(probe)
    if args.recursive is not None:
        recursive = args.recursive
    frames = find_recorded_frames(args.folder, patterns, recursive=recursive)
    _check_report_path(args.report)
    configure_logging(args.log_level, settings.daemon.log_format)

    with tempfile.TemporaryDirectory(prefix="crystal-monitor-replay-") as scratch:
        narrowed = replay_settings(settings, probe_id, Path(scratch) / "state")
        problems = check_environment(narrowed)
        if problems:
            raise ReplayError(
                "\n".join(f"config error: {problem}" for problem in problems), EX_CONFIG
            )
        span = frames[-1].ts - frames[0].ts
        speed = "as fast as possible" if args.speed is None else f"at {args.speed:g}x"
        print(
            f"replaying {len(frames)} frames ({duration_text(span)} recorded, from "
            f"{clock_text(frames[0].ts)}) for probe {probe_id}, {speed}",
            file=sys.stderr,
        )
        progress = _ProgressLine(frames[0].ts, span) if sys.stderr.isatty() else None
        result = replay_frames(
            narrowed, probe_id, frames, folder=args.folder, speed=args.speed, progress=progress
        )
        if progress is not None:
            progress.close()
    result.config_path = args.config
    html = render_report(result)
    try:
        args.report.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise ReplayError(f"cannot write the report {args.report}: {exc}", EX_CANTCREAT) from exc
    sys.stdout.write(summarize(result, args.report))
    return 0


class _ProgressLine:
    """Recorded time replayed so far, rewritten in place on a terminal twice a second."""

    def __init__(self, origin: float, span: float) -> None:
        self._origin = origin
        self._span = span
        self._shown = 0.0

    def __call__(self, ts: float, recorded: int) -> None:
        now = time.monotonic()
        if now - self._shown < 0.5:
            return
        self._shown = now
        done = f"{duration_text(ts - self._origin)} of {duration_text(self._span)}"
        print(f"\r  {done} recorded time, {recorded} frames", end="", file=sys.stderr)

    def close(self) -> None:
        print(file=sys.stderr)


_STATUS_WORDS = {
    "ok": "classified",
    "rejected": "rejected by the quality gate",
    "error": "unreadable",
}


def summarize(result: ReplayResult, report: Path) -> str:
    """The short stdout summary: frames, alarms raised and when, where the report is."""
    statuses: dict[str, int] = {}
    for row in result.results:
        status = str(row["status"])
        statuses[status] = statuses.get(status, 0) + 1
    counted = [
        f"{statuses.pop(status)} {word}"
        for status, word in _STATUS_WORDS.items()
        if status in statuses
    ]
    counted += [f"{count} {status}" for status, count in sorted(statuses.items())]
    if result.lost_frames:
        counted.append(f"{result.lost_frames} not classified (inference failed)")
    first = clock_text(result.first_ts)
    last = clock_text(result.last_ts).split(" ")[1]
    lines = [
        f"replayed {result.frames} frames of probe {result.probe.id} ({first} to {last} UTC, "
        f"{duration_text(result.last_ts - result.first_ts)} recorded) in {result.wall_s:.1f} s",
        "  frames: " + ", ".join(counted),
    ]
    raised = [e for e in result.alarm_events if e["to_state"] == "active_unacknowledged"]
    if raised:
        lines.append(f"  alarms raised: {len(raised)}")
        for event in raised:
            when = clock_text(event["ts"]).split(" ")[1]
            lines.append(
                f"    {when} UTC ({batch_time(event['ts'], result.first_ts)})  "
                f"{event['alarm_id']} [{event['priority']}]  {event['message']}"
            )
    else:
        lines.append("  alarms raised: none")
    lines.append(f"  report: {report}")
    return "\n".join(lines) + "\n"
