"""`crystal-monitor shadow report`: how a shadow model compared with the live one over a
time range, and whether the promotion rule (docs/model-promotion.md) lets it replace the
live model. Reads the daemon's record; the daemon may keep running."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from monitor.cli.samples import EX_NOINPUT, SAMPLES_DIR
from monitor.cli.subcommands import _load_or_report
from monitor.config.durations import parse_duration
from monitor.config.settings import EX_CONFIG
from monitor.config.shadow import ShadowConfig
from monitor.review.sample_store import SampleStore, SampleStoreError
from monitor.shadow.report import shadow_report
from monitor.shadow.store import ShadowStore, ShadowStoreError
from monitor.timestamps import iso_utc, parse_time
from monitor.wire import to_wire

EX_USAGE = 64
SHADOW_DIR = "shadow"  # as monitor.daemon.SHADOW_DIR; the CLI does not import the daemon
DEFAULT_WINDOW_S = float(ShadowConfig.model_fields["window"].default)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _points(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a plant engineer reads it on a terminal."""
    if report.get("candidate") is None:
        return f"no frame compared yet ({report.get('note', '')})"
    since = "the start" if report["since"] is None else iso_utc(report["since"])
    until = "now" if report["until"] is None else iso_utc(report["until"])
    lines = [
        f"candidate {report['candidate']} against live {', '.join(report['live_models'])}",
        f"from {since} to {until}, windows of {report['window_s']:g} s: {report['frames']} "
        f"frames, {report['crops']} crops, agreement {_percent(report['agreement'])}",
        "",
    ]
    classes = report["classes"]
    header = f"{'window start':<25}{'probe':<10}{'frames':>7}{'crops':>7}{'agree':>9}"
    for name in classes:
        header += f"  {name + ' live/cand (diff, 95 % CI, points)':<44}"
    lines.append(header)
    for window in report["windows"]:
        line = (
            f"{iso_utc(window['start']):<25}{window['probe']:<10}{window['frames']:>7}"
            f"{window['crops']:>7}{_percent(window['agreement']):>9}"
        )
        for name in classes:
            c = window["classes"][name]
            low, high = c["difference_ci"]
            interval = "" if low is None else f" [{_points(low)}, {_points(high)}]"
            mark = " *" if c["significant"] else ""
            cell = (
                f"{_percent(c['live'])}/{_percent(c['candidate'])} "
                f"({_points(c['difference'])}{interval}){mark}"
            )
            line += f"  {cell:<44}"
        lines.append(line)
    labelled = report["labelled"]
    lines += [
        "(* the interval excludes 0: the two models' fractions differ)",
        "",
        f"labelled review crops scored by both: {labelled['crops']}; live right "
        f"{_percent(labelled['live_accuracy'])}, candidate right "
        f"{_percent(labelled['candidate_accuracy'])}; only live right "
        f"{labelled['only_live_right']}, only candidate right "
        f"{labelled['only_candidate_right']} (McNemar p = {labelled['mcnemar_p']:.3g})",
        "",
    ]
    verdict = report["verdict"]
    lines.append("verdict: PROMOTE" if verdict["promote"] else "verdict: do not promote yet")
    lines += [f"  - {reason}" for reason in verdict["reasons"]]
    return "\n".join(lines)


def run_shadow_report(args: argparse.Namespace) -> int:
    """Exit 0 when the verdict is promote, 1 when not (or nothing compared yet)."""
    try:
        since = None if args.since is None else parse_time(args.since, "--since")
        until = None if args.until is None else parse_time(args.until, "--until")
        window_s = None if args.window is None else parse_duration(args.window)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_USAGE
    if window_s is not None and window_s < 10:
        print("error: --window must be at least 10 s", file=sys.stderr)
        return EX_USAGE
    if args.state_dir is not None:
        state_dir = Path(args.state_dir)
    else:
        settings = _load_or_report(args.config)
        if settings is None:
            return EX_CONFIG
        state_dir = settings.daemon.state_dir
        if window_s is None and settings.model.shadow is not None:
            window_s = float(settings.model.shadow.window)
    try:
        shadow = ShadowStore(state_dir / SHADOW_DIR, create=False)
    except ShadowStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_NOINPUT
    try:
        samples: SampleStore | None = SampleStore(state_dir / SAMPLES_DIR, None, create=False)
    except SampleStoreError:
        samples = None  # review off: no labelled crops to score
    try:
        report = shadow_report(
            shadow,
            samples,
            window_s=window_s or DEFAULT_WINDOW_S,
            since=since,
            until=until,
            candidate=args.candidate,
        )
    finally:
        shadow.close()
        if samples is not None:
            samples.close()
    if args.json:
        for key in ("since", "until"):
            if report.get(key) is not None:
                report[key] = iso_utc(report[key])
        for window in report["windows"]:
            window["start"], window["end"] = iso_utc(window["start"]), iso_utc(window["end"])
        print(json.dumps(to_wire(report), indent=2))
    else:
        print(format_report(report))
    return 0 if report.get("verdict", {}).get("promote") else 1


def add_shadow_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("shadow", help="how a shadow model compared with the live one")
    commands = parser.add_subparsers(dest="shadow_command", required=True, metavar="ACTION")
    report = commands.add_parser(
        "report",
        help="the comparison over a time range and the promotion verdict "
        "(exit 0: promote, 1: not yet)",
    )
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the daemon's configuration file")
    source.add_argument("--state-dir", type=Path, help="or the state folder directly")
    report.add_argument("--since", help="from this time (ISO 8601 or epoch seconds)")
    report.add_argument("--until", help="up to this time (ISO 8601 or epoch seconds)")
    report.add_argument(
        "--window", help="window length, e.g. 300 or 5m (default: model.shadow.window, 5m)"
    )
    report.add_argument("--candidate", help="which candidate (default: the latest compared)")
    report.add_argument("--json", action="store_true", help="the report as JSON")
    report.set_defaults(runner=run_shadow_report)
