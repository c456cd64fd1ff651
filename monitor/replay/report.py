"""The replay report: one self-contained HTML file a process engineer can open anywhere.

Inline SVG and CSS only (no code runs, no web font, no CDN), so it can be mailed, archived
with the batch record and opened on a plant PC without network. It shows, in recorded
time: each watched class's share in its alarm window with the 95 % band and the alarm
limits, the probe's input quality, the particle sizes (the batch's size distribution
per class and each class's D50 over time, where the windows carry sizes), the frame
quality (rejected share by reason and the frame rate), a marker wherever an alarm was
raised or cleared, and the alarm events as a table. The data behind the charts is
embedded as JSON for tools.

Every SVG marker carries `data-alarm`, `data-transition` ("raise" or "clear") and
`data-ts` (epoch seconds), so the report can be checked by a program as well as by eye.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from monitor.alarms import (
    AlarmDefinition,
    FractionHighAlarm,
    FractionLowAlarm,
    ImageQualityAlarm,
    OutOfDistributionAlarm,
    ProbeStaleAlarm,
    RateOfChangeAlarm,
    ShiftAlarm,
    UncertainHighAlarm,
    is_diagnostic,
)
from monitor.replay.result import ReplayResult
from monitor.timestamps import iso_utc

WIDTH = 960
LEFT, RIGHT = 64, 24
_PRIORITY_COLOUR = {"low": "#b45309", "medium": "#ea580c", "high": "#dc2626", "critical": "#7f1d1d"}
_CLEAR_COLOUR = "#15803d"
_QUALITY_COLOUR = {"GOOD": "#16a34a", "UNCERTAIN": "#eab308", "BAD": "#dc2626"}
_REASON_COLOURS = ("#7c3aed", "#0891b2", "#db2777", "#65a30d", "#d97706", "#475569")
# The classes' colours in the size charts, in manifest order (blue CEX, purple PG, as on
# the dashboard), clear of the alarm reds and the quality strip's green and yellow.
_CLASS_COLOURS = ("#1d4ed8", "#9333ea", "#0d9488", "#475569", "#a16207", "#be185d")
_MOVING = {"rising": "rising", "falling": "falling", "both": "rising or falling"}
_RAISED = "active_unacknowledged"
_CLEARED = frozenset({"returned_unacknowledged", "normal"})
_TIME_STEPS = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
_BIN_STEPS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)


@dataclass(frozen=True)
class Marker:
    """One alarm raise or clear, as drawn on the charts."""

    alarm_id: str
    transition: str  # "raise" or "clear"
    ts: float
    priority: str
    message: str


def alarm_markers(result: ReplayResult) -> list[Marker]:
    """Raises (condition turned on) and clears (condition turned off) in time order."""
    markers = []
    for event in result.alarm_events:
        to_state = event["to_state"]
        if event.get("cause") != "condition" or event["from_state"] == to_state:
            continue
        if to_state == _RAISED:
            transition = "raise"
        elif to_state in _CLEARED:
            transition = "clear"
        else:
            continue
        markers.append(
            Marker(
                event["alarm_id"],
                transition,
                float(event["ts"]),
                event["priority"],
                event["message"],
            )
        )
    return markers


def render_report(result: ReplayResult) -> str:
    """The whole report as one HTML document."""
    markers = alarm_markers(result)
    sections = [
        _header(result),
        _alarm_summary(result, markers),
        *(_trend_section(result, name, markers) for name in _watched_classes(result)),
        _sizes_section(result),
        _quality_section(result, markers),
        _event_table(result),
        _notes(result),
    ]
    data = json.dumps(_report_data(result, markers), separators=(",", ":"))
    title = f"Replay of {result.folder.name or result.folder} - probe {result.probe.id}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + '\n<script type="application/json" id="replay-data">'
        + data.replace("</", "<\\/")
        + "</script>\n</body>\n</html>\n"
    )


# -- what to show ---------------------------------------------------------------------


def _watched_classes(result: ReplayResult) -> list[str]:
    """Classes some alarm watches (in definition order); all classes if none does."""
    names: list[str] = []
    for definition in result.definitions:
        name = getattr(definition, "class_name", None)
        if name is not None and name in result.classes and name not in names:
            names.append(name)
    return names or list(result.classes)


def _window_for(result: ReplayResult, class_name: str) -> int:
    """The window the class's fraction alarm watches, else the middle (trend) window."""
    for definition in result.definitions:
        if (
            isinstance(definition, FractionHighAlarm | FractionLowAlarm)
            and definition.class_name == class_name
        ):
            return int(definition.window)
    windows = sorted(int(w) for w in result.settings.aggregation.windows)
    return windows[len(windows) // 2]


def _class_series(
    result: ReplayResult, class_name: str, window: int
) -> list[tuple[float, float | None, float | None, float | None, int]]:
    """(ts, fraction, ci low, ci high, particles in window) per publish tick."""
    series = []
    for update in result.updates:
        stats = update.snapshot["windows"].get(str(window), {})
        cls = stats.get("classes", {}).get(class_name, {})
        ci = cls.get("ci95") or (None, None)
        series.append((update.ts, cls.get("fraction"), ci[0], ci[1], int(stats.get("n", 0))))
    return series


# -- sections -------------------------------------------------------------------------


def _header(result: ReplayResult) -> str:
    settings = result.settings
    probe = result.probe
    speed = "as fast as possible" if result.speed is None else f"{result.speed:g}x recorded time"
    stamp_note = (
        f"; {result.frames_without_stamp} without a time in the name (file time used)"
        if result.frames_without_stamp
        else ""
    )
    rows = [
        ("Recorded batch", str(result.folder)),
        ("Probe", f"{probe.id} (sampling: {probe.sampling})"),
        (
            "Recorded",
            f"{clock_text(result.first_ts)} to {clock_text(result.last_ts)} UTC "
            f"({duration_text(result.last_ts - result.first_ts)})",
        ),
        ("Frames", f"{result.frames}{stamp_note}"),
        ("Model", f"{result.model_name} (sha256 {result.model_sha256[:12]})"),
        (
            "Windows",
            ", ".join(_seconds(w) for w in settings.aggregation.windows)
            + f"; alarms evaluated every {_seconds(settings.aggregation.publish_interval)}",
        ),
        ("Configuration", str(result.config_path or "(given in code)")),
        ("Replay", f"{speed}, took {result.wall_s:.1f} s"),
    ]
    if result.lost_frames:
        rows.append(("Not classified", f"{result.lost_frames} frames (inference failed)"))
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return (
        f"<header><h1>Replay report: probe {_e(probe.id)}</h1>"
        '<p class="lead">What the monitor would have shown and which alarms would have '
        "fired on this recorded batch, computed by the daemon's own pipeline and alarm "
        "engine with the configuration below. Times are UTC; +m:ss is time since the first "
        f'frame.</p><table class="facts">{body}</table></header>'
    )


def _alarm_summary(result: ReplayResult, markers: Sequence[Marker]) -> str:
    final = {s["alarm_id"]: s for s in (result.updates[-1].alarms if result.updates else [])}
    rows = []
    for definition in result.definitions:
        raises = [m for m in markers if m.alarm_id == definition.id and m.transition == "raise"]
        clears = [m for m in markers if m.alarm_id == definition.id and m.transition == "clear"]
        first = (
            f"{_clock_short(raises[0].ts)} ({_since(raises[0].ts, result)})" if raises else "never"
        )
        status = final.get(definition.id, {})
        end_state = "active" if status.get("active") else "not active"
        if status.get("suppressed"):
            end_state += ", suppressed (bad input)"
        css = "fired" if raises else "quiet"
        rows.append(
            f'<tr class="{css}"><td><b>{_e(definition.id)}</b></td>'
            f"<td>{_e(definition.priority)}</td><td>{_e(describe_alarm(definition))}</td>"
            f'<td>{_e(first)}</td><td class="num">{len(raises)}</td>'
            f'<td class="num">{len(clears)}</td><td>{_e(end_state)}</td></tr>'
        )
    if not rows:
        rows.append(
            '<tr><td colspan="7">No alarm in the configuration watches this probe.</td></tr>'
        )
    return (
        "<section><h2>Where each configured alarm would have fired</h2>"
        '<table class="tbl"><thead><tr><th>Alarm</th><th>Priority</th><th>Condition</th>'
        "<th>First raised</th><th>Raised</th><th>Cleared</th><th>At the end</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def describe_alarm(definition: AlarmDefinition) -> str:
    """The alarm's condition in plain words, with its delays."""
    text: str
    if isinstance(definition, FractionHighAlarm | FractionLowAlarm):
        high = isinstance(definition, FractionHighAlarm)
        clear = (
            definition.limit - definition.deadband
            if high
            else definition.limit + definition.deadband
        )
        what = "confusion-adjusted share" if definition.use_adjusted else "share"
        text = (
            f"{definition.class_name} {what} in the {_seconds(definition.window)} window "
            f"{'above' if high else 'below'} {_pct(definition.limit)} "
            f"(clears {'below' if high else 'above'} {_pct(clear)}; "
            f"needs {definition.min_count} particles)"
        )
    elif isinstance(definition, RateOfChangeAlarm):
        text = (
            f"{definition.class_name} share {_MOVING[definition.direction]} faster than "
            f"{definition.limit_per_min * 100:.2g} percentage points per minute "
            f"(slope over the trend window)"
        )
    elif isinstance(definition, ShiftAlarm):
        text = (
            f"CUSUM on {definition.class_name}: rate shifted from {_pct(definition.baseline)} "
            f"towards {_pct(definition.shifted)} (threshold {definition.threshold:g})"
        )
    elif isinstance(definition, ProbeStaleAlarm):
        text = f"no frame for more than {_seconds(definition.max_age)}"
    elif isinstance(definition, ImageQualityAlarm):
        text = (
            f"more than {_pct(definition.limit)} of frames rejected in the "
            f"{_seconds(definition.window)} window"
        )
    elif isinstance(definition, UncertainHighAlarm):
        text = (
            f"more than {_pct(definition.limit)} of particles uncertain in the "
            f"{_seconds(definition.window)} window"
        )
    elif isinstance(definition, OutOfDistributionAlarm):
        text = (
            f"more than {_pct(definition.limit)} of particles out of the model's distribution "
            f"(not crystals it knows) in the {_seconds(definition.window)} window"
        )
    else:
        text = f"{definition.kind}: a system alarm of the live publishers, never raised in a replay"
    delays = []
    if definition.on_delay:
        delays.append(f"on-delay {_seconds(definition.on_delay)}")
    if definition.off_delay:
        delays.append(f"off-delay {_seconds(definition.off_delay)}")
    if definition.latching:
        delays.append("latching")
    return text + (f"; {', '.join(delays)}" if delays else "")


def _trend_section(result: ReplayResult, class_name: str, markers: Sequence[Marker]) -> str:
    window = _window_for(result, class_name)
    series = _class_series(result, class_name, window)
    limits: list[tuple[float, str, bool]] = []  # (value, label, is the clearing line)
    for definition in result.definitions:
        if (
            isinstance(definition, FractionHighAlarm | FractionLowAlarm)
            and definition.class_name == class_name
        ):
            high = isinstance(definition, FractionHighAlarm)
            scope = "" if int(definition.window) == window else f", {_seconds(definition.window)}"
            limits.append(
                (definition.limit, f"{definition.id} {_pct(definition.limit)}{scope}", False)
            )
            clear = definition.limit + (-definition.deadband if high else definition.deadband)
            limits.append((clear, f"clears {_pct(clear)}", True))
    values = [v for row in series for v in (row[1], row[3]) if v is not None]
    top = max([*values, *(value for value, _, _ in limits), 0.02])
    y_max = _nice_ceiling(min(1.0, top * 1.15))
    chart = _Chart(result, y_max=y_max, markers=markers, height=320)
    parts = [chart.frame(y_label=f"{class_name} share", percent=True)]
    for segment in _segments([(ts, lo, hi) for ts, _, lo, hi, _ in series]):
        upper = " ".join(f"{chart.x(ts):.1f},{chart.y(hi):.1f}" for ts, _, hi in segment)
        lower = " ".join(f"{chart.x(ts):.1f},{chart.y(lo):.1f}" for ts, lo, _ in reversed(segment))
        parts.append(
            f'<polygon class="band" points="{upper} {lower}"><title>95 % interval</title></polygon>'
        )
    for segment in _segments([(ts, f, f) for ts, f, _, _, _ in series]):
        points = " ".join(f"{chart.x(ts):.1f},{chart.y(f):.1f}" for ts, f, _ in segment)
        parts.append(f'<polyline class="trend" points="{points}"/>')
    for value, label, clearing in limits:
        y = chart.y(value)
        css = "clear-line" if clearing else "limit"
        parts.append(
            f'<line class="{css}" x1="{chart.left}" x2="{chart.right}" y1="{y:.1f}" y2="{y:.1f}">'
            f"<title>{_e(label)}</title></line>"
        )
        if not clearing:
            parts.append(
                f'<text class="limit-label" x="{chart.right - 4}" y="{y - 4:.1f}" '
                f'text-anchor="end">{_e(label)}</text>'
            )
    parts.append(chart.quality_strip(result))
    parts.append(chart.markers_svg(markers))
    legend = (
        f'<span class="key line"></span>{_e(class_name)} share in the {_seconds(window)} window '
        '<span class="key band"></span>95 % interval '
        '<span class="key limit"></span>alarm limit '
        '<span class="key clear"></span>clearing level '
        '<span class="key raise"></span>alarm raised '
        '<span class="key cleared"></span>alarm cleared; strip: input quality '
        '(<span class="q good">good</span> <span class="q uncertain">uncertain</span> '
        '<span class="q bad">bad: process alarms suppressed</span>)'
    )
    data = f"data-class={_q(class_name)} data-window={_q(str(window))}"
    return (
        f"<section><h2>{_e(class_name)} share over the batch</h2>"
        f"{chart.svg(parts, css='trend-chart', data=data)}"
        f'<p class="legend">{legend}</p></section>'
    )


def _quality_section(result: ReplayResult, markers: Sequence[Marker]) -> str:
    span = max(result.last_ts - result.first_ts, 1.0)
    bin_s = next((s for s in _BIN_STEPS if s >= span / 100), _BIN_STEPS[-1])
    count = int(span // bin_s) + 1
    totals = [0] * count
    by_reason: dict[str, list[int]] = {}
    for row in result.results:
        index = min(count - 1, max(0, int((float(row["ts"]) - result.first_ts) // bin_s)))
        totals[index] += 1
        if row["status"] != "ok":
            reason = str(row.get("reason") or row["status"])
            by_reason.setdefault(reason, [0] * count)[index] += 1
    reasons = sorted(by_reason, key=lambda r: -sum(by_reason[r]))
    diagnostic = [m for m in markers if _is_diagnostic(result, m.alarm_id)]

    share_chart = _Chart(result, y_max=1.0, markers=diagnostic, height=220)
    parts = [share_chart.frame(y_label="frames not classified", percent=True)]
    for index in range(count):
        if not totals[index]:
            continue
        x0 = share_chart.x(result.first_ts + index * bin_s)
        x1 = share_chart.x(min(result.first_ts + (index + 1) * bin_s, result.last_ts))
        base = 0.0
        for n, reason in enumerate(reasons):
            share = by_reason[reason][index] / totals[index]
            if not share:
                continue
            y0, y1 = share_chart.y(base), share_chart.y(base + share)
            when = _clock_short(result.first_ts + index * bin_s)
            parts.append(
                f'<rect class="reject" x="{x0:.1f}" y="{y1:.1f}" '
                f'width="{max(x1 - x0 - 0.5, 0.5):.1f}" height="{y0 - y1:.1f}" '
                f'fill="{_reason_colour(n)}">'
                f"<title>{_e(reason)}: {share:.0%} at {when}</title></rect>"
            )
            base += share
    for definition in result.definitions:
        if isinstance(definition, ImageQualityAlarm):
            y = share_chart.y(definition.limit)
            label = (
                f"{definition.id} {_pct(definition.limit)} ({_seconds(definition.window)} window)"
            )
            parts.append(
                f'<line class="limit" x1="{share_chart.left}" x2="{share_chart.right}" '
                f'y1="{y:.1f}" y2="{y:.1f}"/><text class="limit-label" x="{share_chart.right - 4}" '
                f'y="{y - 4:.1f}" text-anchor="end">{_e(label)}</text>'
            )
    parts.append(share_chart.markers_svg(diagnostic))

    per_minute = [n * 60.0 / bin_s for n in totals]
    rate_chart = _Chart(
        result, y_max=_nice_ceiling(max([*per_minute, 1.0]) * 1.1), markers=(), height=180
    )
    rate_parts = [rate_chart.frame(y_label="frames / min", percent=False)]
    for index, total in enumerate(totals):
        if not total:
            continue
        rejected = sum(by_reason[r][index] for r in reasons)
        x0 = rate_chart.x(result.first_ts + index * bin_s)
        x1 = rate_chart.x(min(result.first_ts + (index + 1) * bin_s, result.last_ts))
        width = max(x1 - x0 - 0.5, 0.5)
        for value, css in (
            (total * 60.0 / bin_s, "rate-all"),
            ((total - rejected) * 60.0 / bin_s, "rate-ok"),
        ):
            y = rate_chart.y(value)
            rate_parts.append(
                f'<rect class="{css}" x="{x0:.1f}" y="{y:.1f}" width="{width:.1f}" '
                f'height="{rate_chart.bottom - y:.1f}"/>'
            )
    keys = (
        " ".join(
            f'<span class="key" style="background:{_reason_colour(n)}"></span>{_e(r)}'
            for n, r in enumerate(reasons)
        )
        or "none: every frame passed the quality gate"
    )
    return (
        "<section><h2>Frame quality</h2>"
        f"<p>Share of frames not classified per {_seconds(bin_s)}, by reason: {keys}</p>"
        f"{share_chart.svg(parts, css='quality-chart')}"
        f'<p>Frames per minute (<span class="key rate-ok"></span>classified, '
        f'<span class="key rate-all"></span>all)</p>'
        f"{rate_chart.svg(rate_parts, css='rate-chart')}</section>"
    )


def _event_table(result: ReplayResult) -> str:
    rows = []
    for event in result.alarm_events:
        change = f"{event['from_state'].replace('_', ' ')} → {event['to_state'].replace('_', ' ')}"
        rows.append(
            f'<tr class="{_e(event["priority"])}"><td>{_clock_short(event["ts"])}</td>'
            f"<td>{_since(event['ts'], result)}</td><td><b>{_e(event['alarm_id'])}</b></td>"
            f"<td>{_e(event['priority'])}</td><td>{_e(change)}</td>"
            f"<td>{_e(event['message'])}</td></tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="6">No alarm changed state during this batch.</td></tr>')
    return (
        '<section><h2>Alarm events</h2><table class="tbl"><thead><tr><th>Time (UTC)</th>'
        "<th>Batch time</th><th>Alarm</th><th>Priority</th><th>Change</th><th>Message</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _notes(result: ReplayResult) -> str:
    interval = _seconds(result.settings.aggregation.publish_interval)
    return (
        '<section class="notes"><h2>How to read this</h2><ul>'
        "<li>The share is the fraction of the class among the confidently classified "
        "particles in the sliding window ending at each point; the band is its 95 % "
        "confidence interval, widened for particles of one frame being alike.</li>"
        f"<li>Alarms are evaluated every {interval} of recorded time, exactly as the live "
        "daemon evaluates them: an alarm is raised once its condition has held for its "
        "on-delay, and clears once the value is back inside the limit by the deadband for "
        "its off-delay. A marker is drawn at the evaluation that changed the state.</li>"
        "<li>While the input quality is bad (no frames, most frames rejected, most particles "
        "uncertain) the process alarms are suppressed and hold their state.</li>"
        "<li>Nobody acknowledges alarms during a replay, so a cleared alarm shows as "
        "'returned unacknowledged'.</li></ul></section>"
    )


def _report_data(result: ReplayResult, markers: Sequence[Marker]) -> dict[str, Any]:
    return {
        "probe": result.probe.id,
        "folder": str(result.folder),
        "first_ts": result.first_ts,
        "last_ts": result.last_ts,
        "frames": result.frames,
        "publish_interval_s": result.settings.aggregation.publish_interval,
        "wall_s": result.wall_s,
        "markers": [
            {"alarm_id": m.alarm_id, "transition": m.transition, "ts": m.ts} for m in markers
        ],
        "events": result.alarm_events,
        "trend": {
            name: [
                {"ts": ts, "fraction": f, "ci95": [lo, hi], "n": n}
                for ts, f, lo, hi, n in _class_series(result, name, _window_for(result, name))
            ]
            for name in _watched_classes(result)
        },
        "sizes": _sizes_data(result),
    }


# -- particle sizes -------------------------------------------------------------------


@dataclass(frozen=True)
class ClassSizes:
    """One class's sizes over the whole batch, from its windows' histograms."""

    count: int
    histogram: list[int]
    quantiles: dict[str, float | None]
    """D10/D50/D90 ("d10", ...) and square-weighted ("d10_sq", ...) read off the summed
    histogram: interpolated within a bin on the log scale, so good to a bin's width."""
    mean_aspect_ratio: float | None


@dataclass(frozen=True)
class BatchSizes:
    """The batch's size distribution per class: the histograms of back-to-back windows
    summed, so that each particle counts once."""

    window: int
    unit: str
    bin_edges: list[float]
    tiles: int
    classes: dict[str, ClassSizes]


def _window_sizes(snapshot: dict[str, Any], window: int) -> dict[str, Any] | None:
    """A snapshot's "sizes" of `window`, or None where the daemon wrote none."""
    sizes = snapshot.get("windows", {}).get(str(window), {}).get("sizes")
    if not sizes or len(sizes.get("bin_edges") or ()) < 2:
        return None
    return dict(sizes)


def _size_window(result: ReplayResult) -> int:
    """The window the size charts read: the first watched class's (its share chart's)."""
    return _window_for(result, _watched_classes(result)[0])


def histogram_quantile(
    edges: Sequence[float], weights: Sequence[float], probability: float
) -> float | None:
    """The diameter below which `probability` of the weight lies, interpolated on the log
    scale within the bin that crosses it; None without weight."""
    total = sum(weights)
    if total <= 0:
        return None
    target = probability * total
    below = 0.0
    for index, weight in enumerate(weights):
        if weight > 0 and below + weight >= target:
            share = (target - below) / weight
            low, high = edges[index], edges[index + 1]
            return float(low * (high / low) ** share)
        below += weight
    return float(edges[-1])


def batch_sizes(result: ReplayResult, window: int) -> BatchSizes | None:
    """The windows of `window` seconds ending at the last evaluation with sizes, then
    every `window` seconds before it, summed (windows are (end - window, end], so these
    count each particle once; frames before the first evaluation that a tile does not
    reach, at most one publish interval's, are left out). None when no evaluation has
    sizes; tiles with other bin edges or another unit than the last are left out."""
    sized = [(u.ts, s) for u in result.updates if (s := _window_sizes(u.snapshot, window))]
    if not sized:
        return None
    end_ts, last = sized[-1]
    unit, edges = str(last.get("unit", "")), [float(e) for e in last["bin_edges"]]
    tiles: list[dict[str, Any]] = []
    target = end_ts
    for ts, sizes in reversed(sized):
        if ts > target + 1e-6:
            continue
        if sizes.get("unit") == unit and [float(e) for e in sizes["bin_edges"]] == edges:
            tiles.append(sizes)
        target = ts - window
    classes: dict[str, ClassSizes] = {}
    for name in result.classes:
        histogram = [0] * (len(edges) - 1)
        aspect_sum, aspect_n = 0.0, 0
        for tile in tiles:
            figures = tile.get("classes", {}).get(name) or {}
            for index, n in enumerate(figures.get("histogram") or ()):
                if index < len(histogram):
                    histogram[index] += int(n)
            ratio, count = figures.get("mean_aspect_ratio"), int(figures.get("count") or 0)
            if ratio is not None and count:
                aspect_sum += float(ratio) * count
                aspect_n += count
        squares = [n * edges[i] * edges[i + 1] for i, n in enumerate(histogram)]
        quantiles: dict[str, float | None] = {}
        for key, probability in (("d10", 0.1), ("d50", 0.5), ("d90", 0.9)):
            quantiles[key] = histogram_quantile(edges, histogram, probability)
            quantiles[f"{key}_sq"] = histogram_quantile(edges, squares, probability)
        classes[name] = ClassSizes(
            count=sum(histogram),
            histogram=histogram,
            quantiles=quantiles,
            mean_aspect_ratio=aspect_sum / aspect_n if aspect_n else None,
        )
    return BatchSizes(window, unit, edges, len(tiles), classes)


def _d50_series(
    result: ReplayResult, class_name: str, window: int
) -> list[tuple[float, float | None, float | None]]:
    """(ts, D50, square-weighted D50) of the class per evaluation; None without sizes."""
    series = []
    for update in result.updates:
        sizes = _window_sizes(update.snapshot, window) or {}
        figures = sizes.get("classes", {}).get(class_name) or {}
        series.append((update.ts, figures.get("d50"), figures.get("d50_sq")))
    return series


def _unit_text(unit: str) -> str:
    return "µm" if unit == "um" else unit


def size_text(value: float | None, unit: str) -> str:
    """A diameter to three significant figures or so, with its unit ("42.1 µm")."""
    if value is None:
        return "–"
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:.{digits}f} {_unit_text(unit)}"


def _class_colour(result: ReplayResult, name: str) -> str:
    index = result.classes.index(name) if name in result.classes else 0
    return _CLASS_COLOURS[index % len(_CLASS_COLOURS)]


def _sizes_section(result: ReplayResult) -> str:
    window = _size_window(result)
    batch = batch_sizes(result, window)
    if batch is None:
        return (
            '<section class="sizes"><h2>Particle sizes</h2><p class="no-sizes">No sizes yet: '
            "no window of this replay carries size statistics (the daemon that replayed it "
            "does not measure particle sizes).</p></section>"
        )
    unit = _unit_text(batch.unit)
    pixels = (
        " Sizes are in pixels: set <code>probes.pixel_size_um</code> (the probe's "
        "calibration) for micrometres."
        if batch.unit == "px"
        else ""
    )
    rows = []
    for name in result.classes:
        cls = batch.classes[name]
        q = cls.quantiles
        aspect = "–" if cls.mean_aspect_ratio is None else f"{cls.mean_aspect_ratio:.2f}"
        cells = [
            str(cls.count),
            *(size_text(q[key], batch.unit) for key in ("d10", "d50", "d90", "d50_sq")),
            aspect,
        ]
        rows.append(
            f'<tr data-class={_q(name)}><td><b style="color:{_class_colour(result, name)}">'
            f"{_e(name)}</b></td>"
            + "".join(f'<td class="num">{_e(cell)}</td>' for cell in cells)
            + "</tr>"
        )
    table = (
        '<table class="tbl size-table"><thead><tr><th>Class</th><th class="num">Particles</th>'
        '<th class="num">D10</th><th class="num">D50</th><th class="num">D90</th>'
        '<th class="num">D50, d²-weighted</th><th class="num">Mean aspect ratio</th></tr>'
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return (
        '<section class="sizes"><h2>Particle sizes</h2>'
        f"<p>Equivalent circle diameter (ECD) in {unit} of the confidently classified "
        f"particles: the batch's distribution per class, summed over {batch.tiles} "
        f"back-to-back {_seconds(window)} windows (each particle once; D values read off "
        f"those bins), and the D50 of each {_seconds(window)} window over the batch.{pixels}"
        f"</p>{table}{_size_distribution_svg(result, batch)}"
        f"{_d50_chart(result, batch)}</section>"
    )


def _size_distribution_svg(result: ReplayResult, batch: BatchSizes) -> str:
    """Per class a row of bars on a log ECD axis (share of the class's particles per
    bin), the batch's D10/D50/D90 marked."""
    edges = batch.bin_edges
    filled = [i for cls in batch.classes.values() for i, n in enumerate(cls.histogram) if n]
    first = max(0, min(filled, default=0) - 1)
    last = min(len(edges) - 2, max(filled, default=len(edges) - 2) + 1)
    lo, hi = edges[first], edges[last + 1]
    left, right = LEFT, WIDTH - RIGHT
    row_h, top, bottom_margin = 130, 8, 44
    names = list(result.classes)
    height = top + row_h * len(names) + bottom_margin

    def x(diameter: float) -> float:
        share = (math.log(diameter) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return left + share * (right - left)

    # The diameter gridlines first, so that the bars are drawn over them.
    parts = []
    axis_y = height - bottom_margin
    power = math.floor(math.log10(lo))
    while 10.0**power <= hi * (1 + 1e-9):
        for m in (1, 2, 5):
            tick = m * 10.0**power
            if lo * (1 - 1e-9) <= tick <= hi * (1 + 1e-9):
                parts.append(
                    f'<line class="gridline" x1="{x(tick):.1f}" x2="{x(tick):.1f}" '
                    f'y1="{top + 24}" y2="{axis_y}"/><text class="tick" x="{x(tick):.1f}" '
                    f'y="{axis_y + 16}" text-anchor="middle">{tick:g}</text>'
                )
        power += 1
    for row, name in enumerate(names):
        cls = batch.classes[name]
        colour = _class_colour(result, name)
        row_top = top + row * row_h
        y0, y1 = row_top + row_h - 10, row_top + 58
        shares = [n / cls.count if cls.count else 0.0 for n in cls.histogram]
        y_max = _nice_ceiling(min(1.0, max([*shares, 0.05]) * 1.1))

        def y(value: float, y0: float = y0, y1: float = y1, y_max: float = y_max) -> float:
            return y0 - value / y_max * (y0 - y1)

        aspect = (
            ""
            if cls.mean_aspect_ratio is None
            else f" · mean aspect ratio {cls.mean_aspect_ratio:.2f}"
        )
        group = [
            f'<g class="size-row" data-class={_q(name)}>'
            f'<text class="size-caption" x="{left}" y="{row_top + 16}" fill="{colour}">'
            f"{_e(name)} · {cls.count} particles{aspect}</text>"
        ]
        for value in (0.0, y_max):
            group.append(
                f'<line class="gridline" x1="{left}" x2="{right}" y1="{y(value):.1f}" '
                f'y2="{y(value):.1f}"/><text class="tick" x="{left - 6}" y="{y(value) + 4:.1f}" '
                f'text-anchor="end">{value * 100:.0f} %</text>'
            )
        for index, n in enumerate(cls.histogram):
            if not n or index < first or index > last:
                continue
            x0, x1 = x(edges[index]), x(edges[index + 1])
            group.append(
                f'<rect class="bar" x="{x0 + 1:.1f}" y="{y(shares[index]):.1f}" '
                f'width="{max(x1 - x0 - 2, 1):.1f}" height="{y0 - y(shares[index]):.1f}" '
                f'fill="{colour}" data-class={_q(name)} data-bin="{index}" data-count="{n}">'
                f"<title>{_e(name)} {size_text(edges[index], batch.unit)} – "
                f"{size_text(edges[index + 1], batch.unit)}: {n} particles "
                f"({shares[index]:.1%})</title></rect>"
            )
        for level, key in enumerate(("d10", "d50", "d90")):
            quantile = cls.quantiles[key]
            if quantile is None or not lo <= quantile <= hi:
                continue
            qx = x(quantile)
            label_y = row_top + (34 if level == 1 else 49)
            text = f"{key.upper()} {size_text(quantile, batch.unit)}"
            # D10's label left of its line, the others right: away from the D50 line.
            place = f'x="{qx - 3:.1f}" text-anchor="end"' if level == 0 else f'x="{qx + 3:.1f}"'
            group.append(
                f'<g class="quantile" data-class={_q(name)} data-quantile="{key.upper()}" '
                f'data-value="{quantile:.6g}"><line x1="{qx:.1f}" x2="{qx:.1f}" '
                f'y1="{label_y - 11}" y2="{y0:.1f}" stroke="{colour}"/>'
                f'<text class="quantile-label" {place} y="{label_y}" fill="{colour}">'
                f"{_e(text)}</text></g>"
            )
        group.append("</g>")
        parts.append("".join(group))
    parts.append(
        f'<text class="axis" x="{(left + right) / 2:.0f}" y="{height - 8}" '
        f'text-anchor="middle">equivalent circle diameter ({_unit_text(batch.unit)}), '
        "log scale; bars: share of the class's particles per bin</text>"
    )
    return (
        f'<svg class="chart size-dist" data-unit={_q(batch.unit)} '
        f'data-window="{batch.window}" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
        f'height="{height}" role="img">{"".join(parts)}</svg>'
    )


def _d50_chart(result: ReplayResult, batch: BatchSizes) -> str:
    """Each class's D50 per evaluation over the batch's time, on the share charts' axes."""
    series = {name: _d50_series(result, name, batch.window) for name in result.classes}
    values = [d50 for rows in series.values() for _, d50, _ in rows if d50 is not None]
    chart = _Chart(result, y_max=_nice_ceiling(max([*values, 1.0]) * 1.15), markers=(), height=240)
    parts = [chart.frame(y_label=f"D50 ({_unit_text(batch.unit)})", percent=False)]
    keys = []
    for name, rows in series.items():
        colour = _class_colour(result, name)
        known = [(ts, d50, d50) for ts, d50, _ in rows]
        for segment in _segments(known):
            points = " ".join(f"{chart.x(ts):.1f},{chart.y(v):.1f}" for ts, v, _ in segment)
            parts.append(
                f'<polyline class="d50" points="{points}" stroke="{colour}" data-class={_q(name)}/>'
            )
        last = next(((ts, v) for ts, v, _ in reversed(rows) if v is not None), None)
        if last is not None:
            parts.append(
                f'<text class="last-value" x="{chart.x(last[0]) - 4:.1f}" '
                f'y="{chart.y(last[1]) - 6:.1f}" text-anchor="end" fill="{colour}" '
                f"data-class={_q(name)}>{_e(size_text(last[1], batch.unit))}</text>"
            )
        keys.append(
            f'<span class="key" style="border-top:2px solid {colour};height:0"></span>'
            f"{_e(name)} D50"
        )
    return (
        f"{chart.svg(parts, css='d50-chart', data=f'data-window={_q(str(batch.window))}')}"
        f'<p class="legend">{" ".join(keys)} in the {_seconds(batch.window)} window, '
        f"{_unit_text(batch.unit)}</p>"
    )


def _sizes_data(result: ReplayResult) -> dict[str, Any] | None:
    window = _size_window(result)
    batch = batch_sizes(result, window)
    if batch is None:
        return None
    return {
        "window": window,
        "unit": batch.unit,
        "measure": "ecd",
        "bin_edges": batch.bin_edges,
        "tiles": batch.tiles,
        "batch": {
            name: {
                "count": cls.count,
                "histogram": cls.histogram,
                **cls.quantiles,
                "mean_aspect_ratio": cls.mean_aspect_ratio,
            }
            for name, cls in batch.classes.items()
        },
        "d50": {
            name: [
                {"ts": ts, "d50": d50, "d50_sq": sq}
                for ts, d50, sq in _d50_series(result, name, window)
            ]
            for name in result.classes
        },
    }


# -- drawing --------------------------------------------------------------------------


class _Chart:
    """One time chart: maps recorded time and a value range onto an SVG plot area."""

    def __init__(
        self, result: ReplayResult, *, y_max: float, markers: Sequence[Marker], height: int
    ) -> None:
        self.t0 = result.first_ts
        self.t1 = max(result.last_ts, result.first_ts + 1.0)
        self.y_max = y_max
        self.left = LEFT
        self.right = WIDTH - RIGHT
        self.rows = _label_rows(markers, self)
        self.top = 12 + 14 * max(self.rows.values(), default=-1) + 14 + 6
        self.height = height + self.top
        self.bottom = self.height - 44
        self.strip = (self.bottom + 4, self.bottom + 12)

    def x(self, ts: float) -> float:
        return self.left + (ts - self.t0) / (self.t1 - self.t0) * (self.right - self.left)

    def y(self, value: float) -> float:
        value = min(max(value, 0.0), self.y_max)
        return self.bottom - value / self.y_max * (self.bottom - self.top)

    def frame(self, *, y_label: str, percent: bool) -> str:
        """Axes, grid and tick labels."""
        parts = []
        for value in _ticks(self.y_max):
            y = self.y(value)
            decimals = _decimals(_tick_step(self.y_max) * 100)
            label = f"{value * 100:.{decimals}f} %" if percent else f"{value:g}"
            parts.append(
                f'<line class="gridline" x1="{self.left}" x2="{self.right}" '
                f'y1="{y:.1f}" y2="{y:.1f}"/><text class="tick" x="{self.left - 6}" '
                f'y="{y + 4:.1f}" text-anchor="end">{label}</text>'
            )
        step = next((s for s in _TIME_STEPS if (self.t1 - self.t0) / s <= 10), _TIME_STEPS[-1])
        first = math.ceil(self.t0 / step) * step
        ts = float(first)
        while ts <= self.t1:
            x = self.x(ts)
            parts.append(
                f'<line class="gridline" x1="{x:.1f}" x2="{x:.1f}" '
                f'y1="{self.top}" y2="{self.bottom}"/>'
                f'<text class="tick" x="{x:.1f}" y="{self.bottom + 28}" text-anchor="middle">'
                f"{_clock_hm(ts)}</text>"
            )
            ts += step
        parts.append(
            f'<rect class="plot" x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
            f'height="{self.bottom - self.top}"/>'
            f'<text class="axis" x="14" y="{(self.top + self.bottom) / 2:.0f}" '
            f'transform="rotate(-90 14 {(self.top + self.bottom) / 2:.0f})" '
            f'text-anchor="middle">{_e(y_label)}</text>'
            f'<text class="axis" x="{self.right}" y="{self.height - 4}" text-anchor="end">'
            "time (UTC)</text>"
        )
        return "".join(parts)

    def quality_strip(self, result: ReplayResult) -> str:
        """The probe's input quality per evaluation, as a coloured strip under the plot."""
        interval = result.settings.aggregation.publish_interval
        y0, y1 = self.strip
        runs: list[tuple[float, float, str]] = []  # (from, to, quality), one per stretch
        for update in result.updates:
            start = max(self.t0, update.ts - interval)
            if runs and runs[-1][2] == update.quality:
                runs[-1] = (runs[-1][0], update.ts, update.quality)
            else:
                runs.append((start, update.ts, update.quality))
        parts = []
        for start, end, quality in runs:
            x0, x1 = self.x(start), self.x(end)
            parts.append(
                f'<rect class="quality" x="{x0:.1f}" y="{y0}" width="{max(x1 - x0, 0.5):.1f}" '
                f'height="{y1 - y0}" fill="{_QUALITY_COLOUR[quality]}" data-quality="{quality}">'
                f"<title>input {quality.lower()} {_clock_short(start)} to {_clock_short(end)}"
                "</title></rect>"
            )
        return "".join(parts)

    def markers_svg(self, markers: Sequence[Marker]) -> str:
        parts = []
        for marker in markers:
            x = self.x(marker.ts)
            raised = marker.transition == "raise"
            colour = _PRIORITY_COLOUR.get(marker.priority, "#dc2626") if raised else _CLEAR_COLOUR
            row = self.rows.get(_marker_key(marker), 0)
            label = f"{'▲' if raised else '▽'} {marker.alarm_id} {_clock_short(marker.ts)}"
            dash = "" if raised else ' stroke-dasharray="4 3"'
            what = "raised" if raised else "cleared"
            tip = f"{marker.alarm_id} {what} at {clock_text(marker.ts)} UTC: {marker.message}"
            _, _, anchor = _label_place(x, marker)
            text_x = x + 3 if anchor == "start" else x - 3
            parts.append(
                f'<g class="alarm-marker {marker.transition}" data-alarm={_q(marker.alarm_id)} '
                f'data-transition="{marker.transition}" data-ts="{marker.ts:.3f}" '
                f'data-time="{iso_utc(marker.ts)}">'
                f"<title>{_e(tip)}</title>"
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{12 + 14 * row + 4}" y2="{self.bottom}" '
                f'stroke="{colour}"{dash}/>'
                f'<text class="marker-label" x="{text_x:.1f}" y="{12 + 14 * row + 10}" '
                f'text-anchor="{anchor}" fill="{colour}">{_e(label)}</text></g>'
            )
        return "".join(parts)

    def svg(self, parts: Sequence[str], *, css: str, data: str = "") -> str:
        return (
            f'<svg class="chart {css}" {data} viewBox="0 0 {WIDTH} {self.height}" '
            f'width="{WIDTH}" height="{self.height}" role="img">{"".join(parts)}</svg>'
        )


def _marker_key(marker: Marker) -> tuple[str, str, float]:
    return (marker.alarm_id, marker.transition, marker.ts)


def _label_rows(markers: Sequence[Marker], chart: _Chart) -> dict[tuple[str, str, float], int]:
    """Stack marker labels in rows so neighbouring ones do not overlap."""
    ends: list[float] = []
    rows: dict[tuple[str, str, float], int] = {}
    for marker in sorted(markers, key=lambda m: m.ts):
        start, end, _ = _label_place(chart.x(marker.ts), marker)
        row = next((i for i, taken in enumerate(ends) if taken < start), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = end
        rows[_marker_key(marker)] = row
    return rows


def _label_place(x: float, marker: Marker) -> tuple[float, float, str]:
    """(left, right, text-anchor) of a marker's label: right of its line, or left of it
    where it would run off the chart."""
    width = 6.6 * (len(marker.alarm_id) + 11)  # "▲ id hh:mm:ss" at 11 px, bold
    if x + 3 + width <= WIDTH - 2:
        return x, x + 3 + width, "start"
    return x - 3 - width, x, "end"


def _segments(
    points: Sequence[tuple[float, float | None, float | None]],
) -> list[list[tuple[float, float, float]]]:
    """Runs of points with both values known (no data breaks the line)."""
    runs: list[list[tuple[float, float, float]]] = []
    current: list[tuple[float, float, float]] = []
    for ts, a, b in points:
        if a is None or b is None:
            if current:
                runs.append(current)
            current = []
        else:
            current.append((ts, a, b))
    if current:
        runs.append(current)
    return runs


def _tick_step(top: float) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) giving at most 5 ticks to `top`."""
    raw = max(top, 1e-9) / 5
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))


def _nice_ceiling(top: float) -> float:
    """`top` rounded up to a whole number of tick steps."""
    step = _tick_step(top)
    return math.ceil(top / step - 1e-9) * step


def _ticks(y_max: float) -> list[float]:
    step = _tick_step(y_max)
    return [i * step for i in range(round(y_max / step) + 1)]


def _decimals(step: float) -> int:
    return 0 if abs(step - round(step)) < 1e-9 else 1


def _reason_colour(index: int) -> str:
    return _REASON_COLOURS[index % len(_REASON_COLOURS)]


def _is_diagnostic(result: ReplayResult, alarm_id: str) -> bool:
    return any(d.id == alarm_id and is_diagnostic(d) for d in result.definitions)


# -- formatting -----------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _q(text: str) -> str:
    return f'"{html.escape(text, quote=True)}"'


def _pct(value: float) -> str:
    return f"{value * 100:.3g} %"


def _seconds(value: float) -> str:
    if value >= 3600 and value % 3600 == 0:
        return f"{value / 3600:g} h"
    if value >= 60 and value % 60 == 0:
        return f"{value / 60:g} min"
    return f"{value:g} s"


def clock_text(ts: float) -> str:
    """Date and UTC time of day, to the second."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clock_short(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def _clock_hm(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M")


def duration_text(seconds: float) -> str:
    """A length of time as h:mm:ss, or m:ss under an hour."""
    hours, rest = divmod(round(max(0.0, seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def batch_time(ts: float, origin: float) -> str:
    """Time since the first frame of the batch: +12:35."""
    return "+" + duration_text(ts - origin)


def _since(ts: float, result: ReplayResult) -> str:
    return batch_time(ts, result.first_ts)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2937;
margin:24px auto;max-width:1000px;padding:0 16px;background:#fff}
h1{font-size:22px;margin:0 0 6px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb}
.lead{color:#4b5563;margin:0 0 12px}
table{border-collapse:collapse}th,td{text-align:left;padding:3px 10px 3px 0;vertical-align:top}
.facts th{color:#6b7280;font-weight:500;white-space:nowrap}
.tbl{width:100%}.tbl th{border-bottom:2px solid #d1d5db}.tbl td{border-bottom:1px solid #f3f4f6}
.tbl tr.fired td:first-child{border-left:4px solid #dc2626;padding-left:6px}
.tbl tr.quiet td:first-child{border-left:4px solid #d1d5db;padding-left:6px}
td.num,th.num{text-align:right}
svg.chart{display:block;max-width:100%;height:auto;font-size:11px}
.plot{fill:none;stroke:#9ca3af}line.gridline{stroke:#f3f4f6}
.tick{fill:#6b7280}.axis{fill:#374151;font-size:12px}
.trend{fill:none;stroke:#1d4ed8;stroke-width:2}.band{fill:#93c5fd;fill-opacity:.45;stroke:none}
line.limit{stroke:#dc2626;stroke-width:1.5;stroke-dasharray:8 4}
line.clear-line{stroke:#f59e0b;stroke-width:1;stroke-dasharray:2 3}
.limit-label{fill:#b91c1c;font-size:11px}
.alarm-marker line{stroke-width:1.5}.marker-label{font-size:11px;font-weight:600}
.rate-all{fill:#d1d5db}.rate-ok{fill:#2563eb}
.legend{color:#4b5563;font-size:13px}
.key{display:inline-block;width:18px;height:10px;margin:0 4px 0 10px;vertical-align:middle}
.key.line{border-top:2px solid #1d4ed8;height:0}.key.band{background:#93c5fd}
.key.limit{border-top:2px dashed #dc2626;height:0}
.key.clear{border-top:2px dotted #f59e0b;height:0}
.key.raise{border-left:2px solid #dc2626;width:0}
.key.cleared{border-left:2px dashed #15803d;width:0}
.key.rate-ok{background:#2563eb}.key.rate-all{background:#d1d5db}
.q{padding:0 4px;border-radius:3px;color:#fff}.q.good{background:#16a34a}
.q.uncertain{background:#eab308}.q.bad{background:#dc2626}
.notes{color:#4b5563}
.d50{fill:none;stroke-width:2}.last-value{font-size:12px;font-weight:700}
.size-caption{font-size:12px;font-weight:700}.quantile line{stroke-width:1.5;stroke-dasharray:4 3}
.quantile-label{font-size:11px;font-weight:700}.bar{fill-opacity:.85}
.no-sizes{color:#6b7280}
"""
