"""What each alarm sees in a snapshot, and how good the probe's input is.

`read_alarm` turns one definition and one `ProbeSnapshot.to_json()` into a `Reading`:
the value, whether it is past the activation limit, whether it is past the clearing
limit (the deadband), or that there is not enough data to tell. `quality_of` rates a
probe's input GOOD, UNCERTAIN or BAD from the diagnostic definitions. Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from monitor.config.alarms import (
    AlarmDefinition,
    FractionHighAlarm,
    FractionLowAlarm,
    ImageQualityAlarm,
    OutOfDistributionAlarm,
    ProbeStaleAlarm,
    PublishOverflowAlarm,
    RateOfChangeAlarm,
    ShiftAlarm,
    UncertainHighAlarm,
    is_diagnostic,
)

Quality = Literal["GOOD", "UNCERTAIN", "BAD"]
"""OPC UA-style input quality of one probe."""

_QUALITY_RANK: dict[str, int] = {"GOOD": 0, "UNCERTAIN": 1, "BAD": 2}


def worst_quality(*qualities: Quality | None) -> Quality:
    """The worst of the given qualities (None is ignored; GOOD when all are None)."""
    worst: Quality = "GOOD"
    for quality in qualities:
        if quality is not None and _QUALITY_RANK[quality] > _QUALITY_RANK[worst]:
            worst = quality
    return worst


@dataclass(frozen=True)
class Reading:
    """One alarm's view of one snapshot.

    `above`: the activation criterion holds (value past the limit). `clear`: the clearing
    criterion holds (value inside the limit by at least the deadband). Neither: the value
    is in the deadband and the condition keeps its previous value. `value` None: not
    enough data (below min_count, no trend yet); the alarm holds its state.
    """

    value: float | None
    limit: float
    above: bool
    clear: bool
    reason: str | None = None
    """Why `value` is None, in words for an operator."""


def limit_of(definition: AlarmDefinition) -> float:
    """The number an alarm's value is compared with (shown as {limit} in messages)."""
    if isinstance(definition, RateOfChangeAlarm):
        return definition.limit_per_min
    if isinstance(definition, ShiftAlarm):
        return definition.threshold
    if isinstance(definition, ProbeStaleAlarm):
        return definition.max_age
    if isinstance(definition, PublishOverflowAlarm):
        return 0.0  # any dropped message
    return definition.limit


def unit_of(definition: AlarmDefinition) -> str:
    """The unit of an alarm's value and limit, as every output states it."""
    if isinstance(definition, RateOfChangeAlarm):
        return "fraction/min"
    if isinstance(definition, ShiftAlarm):
        return "log-likelihood ratio"
    if isinstance(definition, ProbeStaleAlarm):
        return "s"
    if isinstance(definition, PublishOverflowAlarm):
        return "messages"
    return "fraction"


def _no_data(limit: float, reason: str) -> Reading:
    return Reading(value=None, limit=limit, above=False, clear=False, reason=reason)


def _window(snapshot: Mapping[str, Any], window_s: float, alarm_id: str) -> Mapping[str, Any]:
    windows: Mapping[str, Any] = snapshot.get("windows", {})
    key = str(int(window_s))
    stats: Mapping[str, Any] | None = windows.get(key)
    if stats is None:
        raise ValueError(
            f"alarm {alarm_id!r} uses window {key}s but the snapshot has windows "
            f"{sorted(windows, key=float)}; add {key}s to aggregation.windows"
        )
    return stats


def _longest_window(snapshot: Mapping[str, Any], alarm_id: str) -> Mapping[str, Any]:
    windows: Mapping[str, Any] = snapshot.get("windows", {})
    if not windows:
        raise ValueError(f"alarm {alarm_id!r}: the snapshot has no windows")
    longest: Mapping[str, Any] = windows[max(windows, key=float)]
    return longest


def _class_stats(stats: Mapping[str, Any], class_name: str, alarm_id: str) -> Mapping[str, Any]:
    classes: Mapping[str, Any] = stats.get("classes", {})
    found: Mapping[str, Any] | None = classes.get(class_name)
    if found is None:
        raise ValueError(
            f"alarm {alarm_id!r} watches class {class_name!r} but the model's classes are "
            f"{list(classes)}; fix class_name"
        )
    return found


def _above_high(value: float, limit: float, deadband: float) -> Reading:
    return Reading(value=value, limit=limit, above=value > limit, clear=value < limit - deadband)


def _read_fraction(
    definition: FractionHighAlarm | FractionLowAlarm, snapshot: Mapping[str, Any]
) -> Reading:
    stats = _window(snapshot, definition.window, definition.id)
    cls = _class_stats(stats, definition.class_name, definition.id)
    n = int(stats.get("n", 0))
    value = cls.get("adjusted" if definition.use_adjusted else "fraction")
    if value is None and definition.use_adjusted and n > 0:
        raise ValueError(
            f"alarm {definition.id!r} uses the adjusted share but the snapshot has none; "
            "ship the validation confusion matrix in the model manifest or set "
            "use_adjusted = false"
        )
    if value is None or n == 0 or n < definition.min_count:
        return _no_data(
            definition.limit,
            f"{n} particles in the {definition.window:g} s window, "
            f"{max(1, definition.min_count)} needed",
        )
    value = float(value)
    if isinstance(definition, FractionHighAlarm):
        return _above_high(value, definition.limit, definition.deadband)
    return Reading(
        value=value,
        limit=definition.limit,
        above=value < definition.limit,
        clear=value > definition.limit + definition.deadband,
    )


def _read_rate(definition: RateOfChangeAlarm, snapshot: Mapping[str, Any]) -> Reading:
    limit = definition.limit_per_min
    if definition.window is None:
        stats = _longest_window(snapshot, definition.id)
    else:
        stats = _window(snapshot, definition.window, definition.id)
    _class_stats(stats, definition.class_name, definition.id)
    trend: Mapping[str, Any] = snapshot.get("trend", {}).get(definition.class_name, {})
    slope = trend.get("slope_per_min")
    n = int(stats.get("n", 0))
    if slope is None or n < definition.min_count:
        return _no_data(limit, f"no trend yet ({n} particles, {definition.min_count} needed)")
    span_s = trend.get("span_s")
    if span_s is not None and float(span_s) < definition.min_span:
        return _no_data(
            limit,
            f"the trend spans {float(span_s):.0f} s, {definition.min_span:g} s needed",
        )
    slope = float(slope)
    if definition.direction == "rising":
        moving = slope
    elif definition.direction == "falling":
        moving = -slope
    else:
        moving = abs(slope)
    return Reading(
        value=slope, limit=limit, above=moving > limit, clear=moving < limit - definition.deadband
    )


def _read_stale(
    definition: ProbeStaleAlarm,
    now: float,
    last_frame_ts: float | None,
    watching_since: float | None,
) -> Reading:
    since = last_frame_ts if last_frame_ts is not None else watching_since
    if since is None:
        return _no_data(definition.max_age, "not watching the probe yet")
    age = now - since
    stale = age > definition.max_age
    return Reading(value=age, limit=definition.max_age, above=stale, clear=not stale)


def read_alarm(
    definition: AlarmDefinition,
    snapshot: Mapping[str, Any],
    now: float,
    *,
    last_frame_ts: float | None,
    watching_since: float | None = None,
    cusum: float = 0.0,
) -> Reading:
    """The alarm's value in this snapshot and where it stands against its limits.

    `last_frame_ts` is the newest frame of any kind (accepted or rejected) from the
    probe; with none yet, a probe counts as stale from `watching_since`. `cusum` is the
    shift alarm's running sum (kept by the engine, not in the snapshot).
    """
    if isinstance(definition, FractionHighAlarm | FractionLowAlarm):
        return _read_fraction(definition, snapshot)
    if isinstance(definition, RateOfChangeAlarm):
        return _read_rate(definition, snapshot)
    if isinstance(definition, ShiftAlarm):
        return Reading(
            value=cusum,
            limit=definition.threshold,
            above=cusum >= definition.threshold,
            clear=cusum <= 0.0,
        )
    if isinstance(definition, ProbeStaleAlarm):
        return _read_stale(definition, now, last_frame_ts, watching_since)
    if isinstance(definition, PublishOverflowAlarm):
        # The daemon adds {"publishing": {name: {"dropped_total", "last_drop_ts"}}}.
        state = snapshot.get("publishing", {}).get(definition.publisher)
        if state is None:
            return _no_data(0.0, f"publisher {definition.publisher!r} reports no counts")
        last_drop = state.get("last_drop_ts")
        active = last_drop is not None and now - float(last_drop) <= definition.hold
        return Reading(
            value=float(state.get("dropped_total", 0)), limit=0.0, above=active, clear=not active
        )
    stats = _window(snapshot, definition.window, definition.id)
    if isinstance(definition, ImageQualityAlarm):
        frames = int(stats.get("frames", 0)) + int(stats.get("rejected_frames", 0))
        if frames < definition.min_frames:
            return _no_data(
                definition.limit,
                f"{frames} frames in the {definition.window:g} s window, "
                f"{definition.min_frames} needed",
            )
        share = float(stats.get("rejected_share", 0.0))
        return _above_high(share, definition.limit, definition.deadband)
    if isinstance(definition, OutOfDistributionAlarm):
        particles = sum(int(stats.get(key, 0)) for key in ("n", "n_uncertain", "n_ood"))
        if particles < definition.min_count:
            return _no_data(definition.limit, _too_few(particles, definition))
        share = float(stats.get("ood_share", 0.0))
        return _above_high(share, definition.limit, definition.deadband)
    assert isinstance(definition, UncertainHighAlarm)
    particles = int(stats.get("n", 0)) + int(stats.get("n_uncertain", 0))
    if particles < definition.min_count:
        return _no_data(definition.limit, _too_few(particles, definition))
    share = float(stats.get("uncertain_share", 0.0))
    return _above_high(share, definition.limit, definition.deadband)


def _too_few(particles: int, definition: OutOfDistributionAlarm | UncertainHighAlarm) -> str:
    return (
        f"{particles} particles in the {definition.window:g} s window, "
        f"{definition.min_count} needed"
    )


def quality_from_readings(readings: Iterable[tuple[AlarmDefinition, Reading]]) -> Quality:
    """The input-quality rule over diagnostic readings (see `quality_of`)."""
    quality: Quality = "GOOD"
    for definition, reading in readings:
        if not is_diagnostic(definition):
            continue
        if reading.above:
            return "BAD"
        if reading.value is None or not reading.clear:
            quality = "UNCERTAIN"
    return quality


def quality_of(
    snapshot: Mapping[str, Any],
    now: float,
    last_frame_ts: float | None,
    definitions: Iterable[AlarmDefinition],
    *,
    watching_since: float | None = None,
) -> Quality:
    """GOOD, UNCERTAIN or BAD input for one probe, judged by its diagnostic definitions.

    The rule: BAD when any diagnostic condition is past its limit right now (no frame
    for longer than max_age, rejected-frame share above its limit, uncertain-particle
    share above its limit). UNCERTAIN when none is, but one is inside its deadband or
    has too little data to judge (fewer than min_frames frames / min_count particles,
    or no frame and no `watching_since`). GOOD otherwise, and always when no diagnostic
    alarm is defined. Pass only the definitions that apply to the probe; process
    definitions are ignored.
    """
    diagnostics = [d for d in definitions if is_diagnostic(d)]
    return quality_from_readings(
        (
            definition,
            read_alarm(
                definition,
                snapshot,
                now,
                last_frame_ts=last_frame_ts,
                watching_since=watching_since,
            ),
        )
        for definition in diagnostics
    )
