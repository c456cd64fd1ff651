"""Alarm engine: definitions, ISA-18.2 states, deadband, delays, shelving, suppression,
CUSUM shift detection, journal and restart persistence."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from monitor.aggregate import FrameRecord, WindowAggregator
from monitor.alarms import (
    ALLOWED_TRANSITIONS,
    AlarmDefinition,
    AlarmEngine,
    AlarmState,
    FractionHighAlarm,
    FractionLowAlarm,
    ImageQualityAlarm,
    ProbeStaleAlarm,
    Quality,
    RateOfChangeAlarm,
    ShiftAlarm,
    Transition,
    UncertainHighAlarm,
    check_definitions,
    parse_definitions,
    quality_of,
    severity_of,
)

NORMAL = AlarmState.NORMAL
UNACK = AlarmState.ACTIVE_UNACKNOWLEDGED
ACK = AlarmState.ACTIVE_ACKNOWLEDGED
RETURNED = AlarmState.RETURNED_UNACKNOWLEDGED
PROBE = "R101"
T0 = 1_700_000_000.0


def snapshot(
    pg: float | None = 0.0,
    *,
    n: int = 1000,
    frames: int = 30,
    rejected: int = 0,
    n_uncertain: int = 0,
    slope: float | None = None,
    adjusted: float | None = None,
    windows: tuple[int, ...] = (60, 300, 900),
) -> dict[str, Any]:
    """A `ProbeSnapshot.to_json()`-shaped dict with the same numbers in every window."""
    total_frames = frames + rejected
    particles = n + n_uncertain
    fraction = None if n == 0 else pg
    cex = None if fraction is None else 1.0 - fraction
    window = {
        "n": n,
        "n_uncertain": n_uncertain,
        "frames": frames,
        "rejected_frames": rejected,
        "rejected_by_reason": {"blur": rejected} if rejected else {},
        "rejected_share": rejected / total_frames if total_frames else 0.0,
        "uncertain_share": n_uncertain / particles if particles else 0.0,
        "particles_per_min": float(n),
        "frames_per_min": float(total_frames),
        "classes": {
            "CEX": {"n": 0, "fraction": cex, "ci95": None, "adjusted": None, "effective_n": 0.0},
            "PG": {
                "n": 0,
                "fraction": fraction,
                "ci95": None,
                "adjusted": adjusted,
                "effective_n": 0.0,
            },
        },
    }
    return {
        "ts": 0.0,
        "batch": "B1",
        "windows": {str(w): window for w in windows},
        "trend": {
            "CEX": {"ewma": cex, "slope_per_min": None if slope is None else -slope},
            "PG": {"ewma": fraction, "slope_per_min": slope},
        },
    }


def high(**overrides: Any) -> FractionHighAlarm:
    fields: dict[str, Any] = {
        "kind": "fraction_high",
        "id": "pg_high",
        "priority": "high",
        "message": "PG {value:.1%} above {limit:.0%}",
        "class_name": "PG",
        "window": "60s",
        "limit": 0.10,
        "deadband": 0.02,
        "min_count": 100,
    }
    fields.update(overrides)
    return FractionHighAlarm.model_validate(fields)


def stale(**overrides: Any) -> ProbeStaleAlarm:
    fields: dict[str, Any] = {
        "kind": "probe_stale",
        "id": "probe_stale",
        "priority": "medium",
        "message": "no frame for {value:.0f} s",
        "max_age": "30s",
    }
    fields.update(overrides)
    return ProbeStaleAlarm.model_validate(fields)


def image_quality(**overrides: Any) -> ImageQualityAlarm:
    fields: dict[str, Any] = {
        "kind": "image_quality",
        "id": "image_quality",
        "priority": "medium",
        "message": "{value:.0%} of frames rejected",
        "window": 60,
        "min_frames": 10,
    }
    fields.update(overrides)
    return ImageQualityAlarm.model_validate(fields)


def run(
    engine: AlarmEngine,
    values: Sequence[float | None],
    *,
    start: float = T0,
    step: float = 10.0,
    probe: str = PROBE,
) -> list[Transition]:
    """Evaluate one snapshot per value (None: no particles), `step` seconds apart."""
    out: list[Transition] = []
    for i, value in enumerate(values):
        now = start + i * step
        snap = snapshot(0.0, n=0) if value is None else snapshot(value)
        out += engine.evaluate(probe, snap, now, last_frame_ts=now)
    return out


def state_of(engine: AlarmEngine, alarm_id: str = "pg_high", probe: str = PROBE) -> AlarmState:
    return next(s.state for s in engine.alarm_states(probe) if s.alarm_id == alarm_id)


def condition_changes(journal: list[Any]) -> list[Transition]:
    return [
        e.transition
        for e in journal
        if e.transition is not None and e.transition.cause == "condition"
    ]


# -- definitions ------------------------------------------------------------------------


def test_priorities_map_to_opc_ua_severities() -> None:
    assert [severity_of(p) for p in ("low", "medium", "high", "critical")] == [
        250,
        500,
        750,
        1000,
    ]


def test_definition_parses_durations_and_defaults() -> None:
    alarm = high(window="5m", on_delay="30s", off_delay="1m")
    assert (alarm.window, alarm.on_delay, alarm.off_delay) == (300.0, 30.0, 60.0)
    assert alarm.latching is False
    assert alarm.probes == ()
    assert alarm.applies_to("any-probe")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"id": "bad id!"}, "pattern"),
        ({"message": "PG {fraction}"}, "{value} and {limit}"),
        ({"message": "PG {value:d}"}, "format spec"),
        ({"limit": 1.5}, "less than or equal to 1"),
        ({"window": "90.5s"}, "whole number of seconds"),
        ({"priority": "urgent"}, "priority"),
        ({"colour": "red"}, "Extra inputs"),
    ],
)
def test_invalid_definition_is_refused_with_the_field(
    overrides: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        high(**overrides)
    assert fragment in str(info.value)


def test_definitions_union_picks_the_kind_and_refuses_duplicate_ids() -> None:
    raw = [
        {
            "kind": "fraction_low",
            "id": "cex_low",
            "priority": "low",
            "message": "CEX low",
            "class_name": "CEX",
            "window": 300,
            "limit": 0.5,
        },
        {"kind": "probe_stale", "id": "stale", "priority": "high", "message": "x", "max_age": 30},
    ]
    definitions = parse_definitions(raw)
    assert [type(d) for d in definitions] == [FractionLowAlarm, ProbeStaleAlarm]
    with pytest.raises(ValueError, match="duplicate alarm id 'stale'"):
        parse_definitions([*raw, raw[1]])
    with pytest.raises(ValueError, match="duplicate alarm id"):
        AlarmEngine([high(), high()])


def test_shift_rates_must_rise() -> None:
    with pytest.raises(ValidationError, match="must be above baseline"):
        ShiftAlarm(
            kind="shift",
            id="s",
            priority="high",
            message="m",
            class_name="PG",
            baseline=0.08,
            shifted=0.02,
            threshold=5,
        )


def test_check_definitions_names_unknown_windows_and_classes() -> None:
    problems = check_definitions([high(window=120, class_name="XX")], [60, 300], ["CEX", "PG"])
    assert len(problems) == 2
    assert "window 120s is not an aggregation window (60s, 300s)" in problems[0]
    assert "class 'XX' is not in the model's classes" in problems[1]
    assert check_definitions([high()], [60, 300], ["CEX", "PG"]) == []


def test_transition_table_lists_exactly_the_isa_moves() -> None:
    moves = {pair for pair in ALLOWED_TRANSITIONS if pair[0] is not pair[1]}
    assert moves == {
        (NORMAL, UNACK),
        (UNACK, ACK),
        (UNACK, RETURNED),
        (ACK, NORMAL),
        (RETURNED, NORMAL),
        (RETURNED, UNACK),
    }


# -- fraction alarms, deadband, delays, min_count ---------------------------------------


def test_fraction_high_activates_above_limit_and_returns_below_deadband() -> None:
    engine = AlarmEngine([high()])
    assert run(engine, [0.05, 0.09]) == []
    (on,) = run(engine, [0.12], start=T0 + 20)
    assert (on.from_state, on.to_state, on.cause) == (NORMAL, UNACK, "condition")
    assert on.message == "PG 12.0% above 10%"
    assert (on.severity, on.value, on.limit) == (750, 0.12, 0.10)
    # 0.085 is inside the deadband (clears below 0.08): still active.
    assert run(engine, [0.085], start=T0 + 30) == []
    (off,) = run(engine, [0.079], start=T0 + 40)
    assert (off.from_state, off.to_state) == (UNACK, RETURNED)


def test_value_oscillating_inside_the_deadband_does_not_chatter() -> None:
    engine = AlarmEngine([high()])
    run(engine, [0.11])
    wobble = [0.081, 0.1, 0.0999, 0.09, 0.1, 0.08] * 10
    assert run(engine, wobble, start=T0 + 10) == []
    assert state_of(engine) is UNACK


def test_fraction_low_activates_below_limit_and_clears_above_limit_plus_deadband() -> None:
    low = FractionLowAlarm(
        kind="fraction_low",
        id="pg_low",
        priority="low",
        message="low",
        class_name="PG",
        window=60,
        limit=0.2,
        deadband=0.05,
        min_count=10,
    )
    engine = AlarmEngine([low])
    transitions = run(engine, [0.3, 0.19, 0.22, 0.24, 0.26])
    assert [(t.to_state, t.ts) for t in transitions] == [(UNACK, T0 + 10), (RETURNED, T0 + 40)]


def test_on_delay_requires_the_condition_to_hold_and_a_dip_restarts_it() -> None:
    engine = AlarmEngine([high(on_delay="30s")])
    # above at 0, 10, 20; clear at 30 (restarts); above from 40: active at 70.
    transitions = run(engine, [0.2, 0.2, 0.2, 0.05, 0.2, 0.2, 0.2, 0.2])
    assert [(t.to_state, t.ts) for t in transitions] == [(UNACK, T0 + 70)]


def test_a_value_inside_the_deadband_does_not_restart_the_on_delay() -> None:
    engine = AlarmEngine([high(on_delay="20s")])
    transitions = run(engine, [0.2, 0.09, 0.2])
    assert [(t.to_state, t.ts) for t in transitions] == [(UNACK, T0 + 20)]


def test_off_delay_requires_the_clear_to_hold() -> None:
    engine = AlarmEngine([high(off_delay="20s")])
    transitions = run(engine, [0.2, 0.05, 0.05, 0.2, 0.05, 0.05, 0.05])
    assert [(t.to_state, t.ts) for t in transitions] == [(UNACK, T0), (RETURNED, T0 + 60)]


def test_below_min_count_the_alarm_holds_its_state() -> None:
    engine = AlarmEngine([high(min_count=500)])
    few = snapshot(0.5, n=499)
    assert engine.evaluate(PROBE, few, T0, last_frame_ts=T0) == []
    (on,) = engine.evaluate(PROBE, snapshot(0.5, n=500), T0 + 1, last_frame_ts=T0 + 1)
    assert on.to_state is UNACK
    few_clear = snapshot(0.0, n=10)
    assert engine.evaluate(PROBE, few_clear, T0 + 2, last_frame_ts=T0 + 2) == []
    assert state_of(engine) is UNACK
    assert engine.alarm_states(PROBE)[0].value == 0.5


def test_adjusted_share_is_used_when_asked() -> None:
    engine = AlarmEngine([high(use_adjusted=True)])
    snap = snapshot(0.5, adjusted=0.01)
    assert engine.evaluate(PROBE, snap, T0, last_frame_ts=T0) == []
    (on,) = engine.evaluate(PROBE, snapshot(0.05, adjusted=0.2), T0 + 1, last_frame_ts=T0 + 1)
    assert on.value == 0.2


def test_adjusted_share_without_confusion_matrix_names_the_fix() -> None:
    engine = AlarmEngine([high(use_adjusted=True)])
    with pytest.raises(ValueError, match="confusion matrix"):
        engine.evaluate(PROBE, snapshot(0.5, adjusted=None), T0, last_frame_ts=T0)


def test_missing_window_names_the_aggregation_setting() -> None:
    engine = AlarmEngine([high(window=120)])
    with pytest.raises(ValueError, match=r"add 120s to aggregation.windows"):
        engine.evaluate(PROBE, snapshot(0.5), T0, last_frame_ts=T0)


def test_rate_of_change_follows_the_trend_slope() -> None:
    rate = RateOfChangeAlarm(
        kind="rate_of_change",
        id="pg_rising",
        priority="medium",
        message="PG rising {value:.3f}/min",
        class_name="PG",
        limit_per_min=0.01,
        deadband=0.004,
        min_count=100,
    )
    engine = AlarmEngine([rate])
    slopes = [0.005, None, 0.012, 0.007, 0.005, -0.05]
    out = []
    for i, slope in enumerate(slopes):
        now = T0 + 10 * i
        out += engine.evaluate(PROBE, snapshot(0.1, slope=slope), now, last_frame_ts=now)
    assert [(t.to_state, t.ts) for t in out] == [(UNACK, T0 + 20), (RETURNED, T0 + 40)]
    assert out[0].message == "PG rising 0.012/min"


def test_rate_of_change_waits_until_the_trend_spans_min_span() -> None:
    """A steep slope fitted on the first seconds of a batch is noise: held as no data."""
    rate = RateOfChangeAlarm(
        kind="rate_of_change",
        id="pg_rising",
        priority="medium",
        message="PG rising {value:.3f}/min",
        class_name="PG",
        limit_per_min=0.01,
        min_count=100,
        min_span=120.0,
    )
    engine = AlarmEngine([rate])
    out = []
    for i, span_s in enumerate([10.0, 60.0, 119.0, 120.0]):
        now = T0 + 10 * i
        steep = snapshot(0.1, slope=0.16)
        steep["trend"]["PG"]["span_s"] = span_s
        out += engine.evaluate(PROBE, steep, now, last_frame_ts=now)
    assert [(t.to_state, t.ts) for t in out] == [(UNACK, T0 + 30)]


def test_definition_limited_to_probes_applies_only_there() -> None:
    engine = AlarmEngine([high(probes=("R101",)), stale(probes=())])
    engine.evaluate("R102", snapshot(0.5), T0, last_frame_ts=T0)
    assert [s.alarm_id for s in engine.alarm_states("R102")] == ["probe_stale"]
    engine.evaluate("R101", snapshot(0.5), T0, last_frame_ts=T0)
    assert [s.alarm_id for s in engine.alarm_states("R101")] == ["pg_high", "probe_stale"]
    assert state_of(engine, probe="R101") is UNACK


# -- acknowledgement and latching -------------------------------------------------------


def test_acknowledge_active_then_clear_returns_to_normal() -> None:
    engine = AlarmEngine([high()])
    run(engine, [0.2])
    result = engine.acknowledge(PROBE, "pg_high", "anna", "seen", T0 + 5)
    assert result.accepted and result.reason is None
    assert [(t.from_state, t.to_state, t.who) for t in result.transitions] == [(UNACK, ACK, "anna")]
    (off,) = run(engine, [0.01], start=T0 + 10)
    assert (off.from_state, off.to_state) == (ACK, NORMAL)


def test_returned_alarm_is_acknowledged_to_normal_or_reactivated() -> None:
    engine = AlarmEngine([high()])
    run(engine, [0.2, 0.01])
    assert state_of(engine) is RETURNED
    (again,) = run(engine, [0.2], start=T0 + 20)
    assert (again.from_state, again.to_state) == (RETURNED, UNACK)
    run(engine, [0.01], start=T0 + 30)
    result = engine.acknowledge(PROBE, "pg_high", "anna", None, T0 + 35)
    assert [(t.from_state, t.to_state) for t in result.transitions] == [(RETURNED, NORMAL)]


@pytest.mark.parametrize(
    ("probe", "alarm_id", "who", "fragment"),
    [
        (PROBE, "nope", "anna", "unknown alarm 'nope'"),
        ("R999", "pg_high", "anna", "unknown probe 'R999'"),
        (PROBE, "pg_high", "  ", "who is required"),
    ],
)
def test_acknowledge_refused_for_unknown_target_or_anonymous_operator(
    probe: str, alarm_id: str, who: str, fragment: str
) -> None:
    engine = AlarmEngine([high()])
    run(engine, [0.2])
    engine.drain_journal()
    result = engine.acknowledge(probe, alarm_id, who, "c", T0 + 1)
    assert not result.accepted
    assert result.reason is not None and fragment in result.reason
    assert result.transitions == ()
    (entry,) = engine.drain_journal()
    assert (entry.event, entry.accepted, entry.reason, entry.comment) == (
        "acknowledge",
        False,
        result.reason,
        "c",
    )
    assert state_of(engine) is UNACK


def test_acknowledge_refused_when_nothing_is_unacknowledged() -> None:
    engine = AlarmEngine([high()])
    run(engine, [0.01])
    result = engine.acknowledge(PROBE, "pg_high", "anna", None, T0 + 1)
    assert not result.accepted
    assert result.reason is not None and "is normal" in result.reason
    run(engine, [0.2], start=T0 + 10)
    assert engine.acknowledge(PROBE, "pg_high", "anna", None, T0 + 11).accepted
    twice = engine.acknowledge(PROBE, "pg_high", "ben", None, T0 + 12)
    assert not twice.accepted
    assert twice.reason is not None and "active_acknowledged" in twice.reason


def test_latching_alarm_stays_active_until_acknowledged_and_cleared() -> None:
    engine = AlarmEngine([high(latching=True)])
    transitions = run(engine, [0.2, 0.01, 0.01])
    assert [t.to_state for t in transitions] == [UNACK]
    (status,) = engine.alarm_states(PROBE)
    assert status.active and status.latched and not status.acknowledged
    result = engine.acknowledge(PROBE, "pg_high", "anna", "reset", T0 + 30)
    assert [(t.from_state, t.to_state, t.cause) for t in result.transitions] == [
        (UNACK, ACK, "acknowledge"),
        (ACK, NORMAL, "condition"),
    ]


def test_latching_alarm_acknowledged_while_active_returns_when_cleared() -> None:
    engine = AlarmEngine([high(latching=True)])
    run(engine, [0.2])
    result = engine.acknowledge(PROBE, "pg_high", "anna", None, T0 + 1)
    assert [t.to_state for t in result.transitions] == [ACK]
    (off,) = run(engine, [0.01], start=T0 + 10)
    assert (off.from_state, off.to_state) == (ACK, NORMAL)


# -- shelving -----------------------------------------------------------------------------


def test_shelved_alarm_is_tracked_but_not_announced_and_reannounced_on_expiry() -> None:
    engine = AlarmEngine([high()])
    before = engine.shelve(PROBE, "pg_high", 60, "anna", "sensor swap", T0)
    assert not before.accepted  # a probe is known once evaluated (or listed in `probes`)
    assert before.reason is not None and "unknown probe" in before.reason
    run(engine, [0.01])
    shelved = engine.shelve(PROBE, "pg_high", 60, "anna", "sensor swap", T0 + 1)
    assert shelved.accepted
    assert [(t.cause, t.to_state) for t in shelved.transitions] == [("shelve", NORMAL)]
    assert run(engine, [0.2, 0.2], start=T0 + 10) == []
    (status,) = engine.alarm_states(PROBE)
    assert status.state is UNACK and status.shelved and status.shelved_until == T0 + 61
    journal = engine.drain_journal()
    hidden = condition_changes(journal)
    assert [(t.to_state, t.announced) for t in hidden] == [(UNACK, False)]
    (expired,) = run(engine, [0.2], start=T0 + 61)
    assert (expired.cause, expired.to_state, expired.announced) == ("shelve_expired", UNACK, True)
    assert not engine.alarm_states(PROBE)[0].shelved


def test_shelve_longer_than_the_maximum_is_refused() -> None:
    engine = AlarmEngine([high()], max_shelve_s=3600)
    run(engine, [0.2])
    result = engine.shelve(PROBE, "pg_high", 7200, "anna", None, T0 + 1)
    assert not result.accepted
    assert result.reason is not None and "longest allowed is 3600s" in result.reason
    for bad in (0.0, -5.0, math.inf, math.nan):
        refused = engine.shelve(PROBE, "pg_high", bad, "anna", None, T0 + 1)
        assert not refused.accepted
    assert not engine.alarm_states(PROBE)[0].shelved
    assert not engine.shelve(PROBE, "pg_high", 60, "", None, T0 + 1).accepted


def test_unshelve_announces_current_state_and_refuses_when_not_shelved() -> None:
    engine = AlarmEngine([high()])
    run(engine, [0.01])
    refused = engine.unshelve(PROBE, "pg_high", "anna", None, T0 + 1)
    assert not refused.accepted
    assert refused.reason is not None and "not shelved" in refused.reason
    engine.shelve(PROBE, "pg_high", 600, "anna", None, T0 + 1)
    run(engine, [0.2], start=T0 + 10)
    result = engine.unshelve(PROBE, "pg_high", "ben", "done", T0 + 20)
    assert [(t.cause, t.to_state, t.who) for t in result.transitions] == [
        ("unshelve", UNACK, "ben")
    ]


# -- bad input: suppression and diagnostics ---------------------------------------------


def test_stale_probe_suppresses_process_alarms_and_one_diagnostic_stands() -> None:
    engine = AlarmEngine([high(), stale(), image_quality()])
    (on,) = engine.evaluate(PROBE, snapshot(0.2), T0, last_frame_ts=T0)
    assert on.alarm_id == "pg_high"
    # The probe goes blind: the windows drain (0 % PG, no particles, all frames old).
    blind = snapshot(0.0, n=5, frames=0, rejected=0)
    transitions = engine.evaluate(PROBE, blind, T0 + 31, last_frame_ts=T0)
    assert [(t.alarm_id, t.to_state) for t in transitions] == [("probe_stale", UNACK)]
    states = {s.alarm_id: s for s in engine.alarm_states(PROBE)}
    assert states["pg_high"].suppressed and states["pg_high"].state is UNACK
    assert states["pg_high"].value == 0.2
    assert states["probe_stale"].quality == "BAD"
    standing = [s for s in states.values() if s.active and not s.suppressed]
    assert [s.alarm_id for s in standing] == ["probe_stale"]


def test_fraction_alarm_holds_while_blind_even_when_the_snapshot_reads_zero() -> None:
    engine = AlarmEngine([high(), image_quality()])
    engine.evaluate(PROBE, snapshot(0.2), T0, last_frame_ts=T0)
    engine.drain_journal()
    blurred = snapshot(0.0, n=1000, frames=2, rejected=28)
    for i in range(1, 6):
        engine.evaluate(PROBE, blurred, T0 + 10 * i, last_frame_ts=T0 + 10 * i)
    states = {s.alarm_id: s for s in engine.alarm_states(PROBE)}
    assert (states["pg_high"].state, states["pg_high"].value) == (UNACK, 0.2)
    assert states["image_quality"].state is UNACK and not states["image_quality"].suppressed
    journal = engine.drain_journal()
    assert [(e.alarm_id, e.event) for e in journal if e.event != "transition"] == [
        ("pg_high", "suppress")
    ]
    assert all(e.alarm_id != "pg_high" for e in journal if e.event == "transition")
    # Frames come back good: the fraction alarm resumes and returns.
    (back,) = [
        t
        for t in engine.evaluate(PROBE, snapshot(0.01), T0 + 60, last_frame_ts=T0 + 60)
        if t.alarm_id == "pg_high"
    ]
    assert back.to_state is RETURNED


def test_only_the_first_ranked_diagnostic_stands_when_several_are_bad() -> None:
    uncertain = UncertainHighAlarm(
        kind="uncertain_high",
        id="uncertain",
        priority="medium",
        message="uncertain",
        window=60,
        limit=0.5,
        min_count=10,
    )
    engine = AlarmEngine([uncertain, image_quality(), stale(), high()])
    bad = snapshot(0.3, n=100, n_uncertain=900, frames=5, rejected=25)
    transitions = engine.evaluate(PROBE, bad, T0 + 100, last_frame_ts=T0)
    assert [t.alarm_id for t in transitions] == ["probe_stale"]
    # Frames arrive again but are mostly rejected: image quality takes over.
    transitions = engine.evaluate(PROBE, bad, T0 + 110, last_frame_ts=T0 + 110)
    assert [t.alarm_id for t in transitions] == ["image_quality", "probe_stale"]
    states = {s.alarm_id: s for s in engine.alarm_states(PROBE)}
    standing = [s.alarm_id for s in states.values() if s.active and not s.suppressed]
    assert standing == ["image_quality"]
    assert states["uncertain"].suppressed and states["pg_high"].suppressed


def test_caller_bad_quality_suppresses_process_alarms_without_a_diagnostic() -> None:
    engine = AlarmEngine([high(), stale()])
    out = engine.evaluate(PROBE, snapshot(0.5), T0, last_frame_ts=T0, quality="BAD")
    assert out == []
    states = {s.alarm_id: s for s in engine.alarm_states(PROBE)}
    assert states["pg_high"].suppressed and states["pg_high"].state is NORMAL
    assert not states["probe_stale"].suppressed


def test_quality_rule_bad_uncertain_good() -> None:
    diagnostics: list[AlarmDefinition] = [stale(), image_quality(deadband=0.1)]
    ok = snapshot(0.1, frames=30, rejected=0)
    assert quality_of(ok, T0, T0, diagnostics) == "GOOD"
    assert quality_of(ok, T0 + 31, T0, diagnostics) == "BAD"
    marginal = snapshot(0.1, frames=15, rejected=15)  # 0.5: in the deadband (0.4, 0.5]
    assert quality_of(marginal, T0, T0, diagnostics) == "UNCERTAIN"
    assert quality_of(snapshot(0.1, frames=10, rejected=20), T0, T0, diagnostics) == "BAD"
    too_few = snapshot(0.1, frames=3, rejected=0)
    assert quality_of(too_few, T0, T0, diagnostics) == "UNCERTAIN"
    assert quality_of(ok, T0 + 1000, None, diagnostics, watching_since=T0) == "BAD"
    assert quality_of(ok, T0 + 1000, None, [high()]) == "GOOD"


def test_probe_that_never_sent_a_frame_goes_stale_after_max_age() -> None:
    engine = AlarmEngine([stale()])
    empty = snapshot(0.0, n=0, frames=0)
    assert engine.evaluate(PROBE, empty, T0, last_frame_ts=None) == []
    assert engine.evaluate(PROBE, empty, T0 + 30, last_frame_ts=None) == []
    (on,) = engine.evaluate(PROBE, empty, T0 + 31, last_frame_ts=None)
    assert (on.alarm_id, on.to_state, on.value, on.message) == (
        "probe_stale",
        UNACK,
        31.0,
        "no frame for 31 s",
    )
    (off,) = engine.evaluate(PROBE, empty, T0 + 40, last_frame_ts=T0 + 39)
    assert off.to_state is RETURNED


# -- CUSUM shift detection --------------------------------------------------------------


def shift_alarm(threshold: float = 8.0) -> ShiftAlarm:
    return ShiftAlarm(
        kind="shift",
        id="pg_shift",
        priority="high",
        message="PG shift, S={value:.1f}",
        class_name="PG",
        baseline=0.02,
        shifted=0.08,
        threshold=threshold,
    )


def feed_frames(
    engine: AlarmEngine, rng: np.random.Generator, rate: float, frames: int, start: float
) -> tuple[int, list[Transition]]:
    """Feed frames of 20 particles at `rate` PG; returns particles fed until the first
    transition (or all) and the transitions."""
    out: list[Transition] = []
    particles = 0
    for i in range(frames):
        ts = start + i
        pg = int(rng.binomial(20, rate))
        engine.observe_counts(PROBE, ts, {"CEX": 20 - pg, "PG": pg})
        particles += 20
        out += engine.evaluate(PROBE, snapshot(0.0), ts, last_frame_ts=ts)
        if out:
            break
    return particles, out


def test_cusum_increments_are_the_log_likelihood_ratios() -> None:
    alarm = shift_alarm()
    inc_pg, inc_other = alarm.increments
    assert inc_pg == pytest.approx(math.log(4.0))
    assert inc_other == pytest.approx(math.log(0.92 / 0.98))
    engine = AlarmEngine([alarm])
    engine.observe_counts(PROBE, T0, {"CEX": 18, "PG": 2})
    engine.evaluate(PROBE, snapshot(0.0), T0, last_frame_ts=T0)
    expected = 2 * inc_pg + 18 * inc_other
    assert engine.alarm_states(PROBE)[0].value == pytest.approx(expected)
    engine.observe_counts(PROBE, T0 + 1, {"CEX": 1000, "PG": 0})
    engine.evaluate(PROBE, snapshot(0.0), T0 + 1, last_frame_ts=T0 + 1)
    assert engine.alarm_states(PROBE)[0].value == 0.0


@pytest.mark.parametrize("seed", range(10))
def test_cusum_detects_a_step_from_2_to_8_percent_within_800_particles(seed: int) -> None:
    engine = AlarmEngine([shift_alarm()])
    rng = np.random.default_rng(seed)
    _, early = feed_frames(engine, rng, 0.02, 50, T0)
    assert early == []
    particles, transitions = feed_frames(engine, rng, 0.08, 1000, T0 + 100)
    assert [t.to_state for t in transitions] == [UNACK]
    assert particles <= 800
    assert transitions[0].value is not None and transitions[0].value >= 8.0


def test_cusum_stays_below_threshold_on_a_long_in_control_stream() -> None:
    alarm = shift_alarm()
    engine = AlarmEngine([alarm])
    rng = np.random.default_rng(20240501)
    highest = 0.0
    for i in range(1000):  # 20,000 particles at the baseline rate
        pg = int(rng.binomial(20, 0.02))
        engine.observe_counts(PROBE, T0 + i, {"CEX": 20 - pg, "PG": pg})
        if i % 10 == 9:
            assert engine.evaluate(PROBE, snapshot(0.0), T0 + i, last_frame_ts=T0 + i) == []
            value = engine.alarm_states(PROBE)[0].value
            assert value is not None
            highest = max(highest, value)
    assert 0.0 < highest < alarm.threshold


def test_cusum_clears_once_the_sum_drifts_back_to_zero_and_reset_restarts_it() -> None:
    engine = AlarmEngine([shift_alarm()])
    rng = np.random.default_rng(3)
    _, on = feed_frames(engine, rng, 0.3, 100, T0)
    assert [t.to_state for t in on] == [UNACK]
    cleared: list[Transition] = []
    for i in range(200):
        engine.observe_counts(PROBE, T0 + 200 + i, {"CEX": 20, "PG": 0})
        cleared += engine.evaluate(PROBE, snapshot(0.0), T0 + 200 + i, last_frame_ts=T0 + 200)
    assert [t.to_state for t in cleared] == [RETURNED]
    engine.observe_counts(PROBE, T0 + 500, {"PG": 5})
    engine.reset_shift(PROBE, T0 + 600)
    engine.observe_counts(PROBE, T0 + 599, {"PG": 50})  # before the reset: ignored
    engine.evaluate(PROBE, snapshot(0.0), T0 + 600, last_frame_ts=T0 + 600)
    assert engine.alarm_states(PROBE)[0].value == 0.0


# -- real aggregator snapshot -----------------------------------------------------------


def test_engine_reads_a_real_window_aggregator_snapshot() -> None:
    aggregator = WindowAggregator(["CEX", "PG"], windows_s=(60, 300, 900))
    for i in range(60):
        pg = 4 if i >= 30 else 0
        aggregator.add(FrameRecord(ts=T0 + i, class_counts=(16, pg), n_uncertain=1))
    aggregator.add(FrameRecord(ts=T0 + 60, class_counts=(0, 0), rejected_reason="blur"))
    snap = aggregator.snapshot(T0 + 60).to_json()
    engine = AlarmEngine([high(), image_quality(), stale()])
    (on,) = engine.evaluate(PROBE, snap, T0 + 60, last_frame_ts=T0 + 60)
    assert on.alarm_id == "pg_high"
    # Window (T0, T0 + 60]: 59 frames of 16 CEX, the last 30 with 4 PG each.
    assert on.value == pytest.approx(120 / (59 * 16 + 120))
    assert engine.alarm_states(PROBE)[0].quality == "GOOD"


# -- journal and persistence -------------------------------------------------------------


def test_journal_records_actions_and_transitions_as_json() -> None:
    engine = AlarmEngine([high()])
    run(engine, [0.2])
    engine.acknowledge(PROBE, "pg_high", "anna", "on it", T0 + 1)
    journal = engine.drain_journal()
    assert [(e.event, e.who) for e in journal] == [
        ("transition", None),
        ("acknowledge", "anna"),
        ("transition", "anna"),
    ]
    assert engine.drain_journal() == []
    encoded = json.loads(json.dumps([e.to_json() for e in journal]))
    assert encoded[1]["comment"] == "on it"
    assert encoded[2]["transition"]["to_state"] == "active_acknowledged"
    status = json.loads(json.dumps(engine.alarm_states(PROBE)[0].to_json()))
    assert status["state"] == "active_acknowledged" and status["severity"] == 750


def test_acknowledged_alarm_is_not_announced_again_after_restore() -> None:
    definitions: list[AlarmDefinition] = [high(on_delay=20), stale()]
    engine = AlarmEngine(definitions)
    run(engine, [0.2, 0.2, 0.2])
    engine.acknowledge(PROBE, "pg_high", "anna", None, T0 + 25)
    saved = json.loads(json.dumps(engine.export_state()))
    restored = AlarmEngine(definitions, state=saved)
    assert state_of(restored) is ACK
    assert run(restored, [0.2, 0.09], start=T0 + 100) == []
    journal = restored.drain_journal()
    assert condition_changes(journal) == []
    markers = [e.transition for e in journal if e.transition is not None]
    assert [(t.cause, t.to_state, t.announced) for t in markers] == [("restore", ACK, False)]


def test_restore_keeps_shelving_and_the_cusum_sum() -> None:
    definitions: list[AlarmDefinition] = [high(), shift_alarm()]
    engine = AlarmEngine(definitions)
    engine.observe_counts(PROBE, T0, {"CEX": 10, "PG": 3})
    run(engine, [0.01])
    engine.shelve(PROBE, "pg_high", 600, "anna", "calibration", T0 + 1)
    restored = AlarmEngine(definitions, state=json.loads(json.dumps(engine.export_state())))
    states = {s.alarm_id: s for s in restored.alarm_states(PROBE)}
    assert states["pg_high"].shelved_until == T0 + 601
    assert states["pg_high"].shelved_by == "anna"
    cusum = engine.alarm_states(PROBE)[1].value
    assert cusum is not None and cusum > 0
    assert states["pg_shift"].value == cusum


def test_restore_drops_alarms_whose_definition_changed_kind_and_refuses_unknown_versions() -> None:
    engine = AlarmEngine([high()])
    run(engine, [0.2])
    saved = engine.export_state()
    changed = FractionLowAlarm(
        kind="fraction_low",
        id="pg_high",
        priority="low",
        message="m",
        class_name="PG",
        window=60,
        limit=0.0,
    )
    restored = AlarmEngine([changed], state=saved)
    assert state_of(restored) is NORMAL
    with pytest.raises(ValueError, match="version"):
        AlarmEngine([high()], state={**saved, "version": 99})


# -- properties ---------------------------------------------------------------------------

# One step of a random history: time advance, the PG fraction (None: not enough
# particles), the input quality the caller passes, and an optional operator action.
_steps = st.lists(
    st.tuples(
        st.sampled_from([0.0, 1.0, 5.0, 10.0, 30.0]),
        st.one_of(
            st.none(),
            # Around each limit (0.2, 0.5, 0.8) and its deadbands, and anything else.
            st.sampled_from([0.0, 0.1, 0.16, 0.25, 0.31, 0.46, 0.55, 0.62, 0.76, 0.9, 1.0]),
            st.floats(0.0, 1.0),
        ),
        st.sampled_from(["GOOD", "GOOD", "GOOD", "BAD"]),
        st.sampled_from([None, None, None, "ack", "ack_anon", "shelve", "shelve_long", "unshelve"]),
    ),
    max_size=40,
)
_definitions = st.builds(
    lambda limit, deadband, on_delay, off_delay, latching: high(
        limit=limit,
        deadband=deadband,
        on_delay=on_delay,
        off_delay=off_delay,
        latching=latching,
        min_count=1,
    ),
    st.sampled_from([0.2, 0.5, 0.8]),
    st.sampled_from([0.0, 0.05, 0.2]),
    st.sampled_from([0.0, 5.0, 20.0]),
    st.sampled_from([0.0, 5.0, 20.0]),
    st.booleans(),
)

Step = tuple[float, float | None, Quality, str | None]


def play(engine: AlarmEngine, steps: list[Step], start: float) -> tuple[list[Any], float]:
    """Apply the steps; returns (everything returned, in order, as JSON) and the end time."""
    now = start
    returned: list[Any] = []
    for dt, value, quality, action in steps:
        now += dt
        snap = snapshot(0.0, n=0) if value is None else snapshot(value)
        transitions = engine.evaluate(PROBE, snap, now, last_frame_ts=now, quality=quality)
        returned.append([t.to_json() for t in transitions])
        if action == "ack":
            result = engine.acknowledge(PROBE, "pg_high", "anna", None, now)
        elif action == "ack_anon":
            result = engine.acknowledge(PROBE, "pg_high", "", None, now)
        elif action == "shelve":
            result = engine.shelve(PROBE, "pg_high", 25.0, "anna", None, now)
        elif action == "shelve_long":
            result = engine.shelve(PROBE, "pg_high", 9 * 3600.0, "anna", None, now)
        elif action == "unshelve":
            result = engine.unshelve(PROBE, "pg_high", "anna", None, now)
        else:
            continue
        returned.append(result.to_json())
    return returned, now


@settings(max_examples=200, deadline=None)
@given(_definitions, _steps)
def test_property_every_state_change_is_allowed(
    definition: FractionHighAlarm, steps: list[Step]
) -> None:
    engine = AlarmEngine([definition])
    play(engine, steps, T0)
    journal = engine.drain_journal()
    state = NORMAL
    for entry in journal:
        t = entry.transition
        if t is None:
            continue
        assert t.cause in ALLOWED_TRANSITIONS[(t.from_state, t.to_state)]
        assert t.from_state is state
        state = t.to_state
    assert state is (state_of(engine) if steps else NORMAL)
    refused = [e for e in journal if not e.accepted]
    assert all(e.reason for e in refused)


@settings(max_examples=200, deadline=None)
@given(_definitions, _steps)
def test_property_activation_only_after_on_delay_and_no_chattering(
    definition: FractionHighAlarm, steps: list[Step]
) -> None:
    """Samples and condition changes are ordered by step (several steps may share a time)."""
    engine = AlarmEngine([definition])
    limit, clear_below = definition.limit, definition.limit - definition.deadband
    now = T0
    used: list[tuple[int, float, float]] = []  # (step, ts, value) the engine could act on
    changes: list[tuple[int, Transition]] = []
    for index, (dt, value, quality, action) in enumerate(steps):
        now += dt
        snap = snapshot(0.0, n=0) if value is None else snapshot(value)
        engine.evaluate(PROBE, snap, now, last_frame_ts=now, quality=quality)
        if value is not None and quality == "GOOD":
            used.append((index, now, value))
        if action == "ack":
            engine.acknowledge(PROBE, "pg_high", "anna", None, now)
        changes += [(index, t) for t in condition_changes(engine.drain_journal())]
    previous: int | None = None
    previous_on = False
    for index, change in changes:
        turned_on = change.to_state is UNACK
        if turned_on:
            last_clear = max((i for i, _, v in used if i <= index and v < clear_below), default=-1)
            first_above = min(
                (ts for i, ts, v in used if last_clear < i <= index and v > limit), default=None
            )
            assert first_above is not None
            assert change.ts - first_above >= definition.on_delay
        if previous is not None:
            between = [v for i, _, v in used if previous < i <= index]
            if previous_on:
                # on -> off, or on -> (latch reset by acknowledge) -> on
                assert any(v < clear_below for v in between)
            if turned_on:
                assert any(v > limit for v in between)
        previous, previous_on = index, turned_on


@settings(max_examples=100, deadline=None)
@given(_definitions, _steps, _steps)
def test_property_restored_engine_behaves_identically(
    definition: FractionHighAlarm, before: list[Step], after: list[Step]
) -> None:
    original = AlarmEngine([definition])
    _, now = play(original, before, T0)
    saved = json.loads(json.dumps(original.export_state()))
    restored = AlarmEngine([definition], state=saved)
    assert [s.to_json() for s in restored.alarm_states(PROBE)] == [
        s.to_json() for s in original.alarm_states(PROBE)
    ]
    assert play(restored, after, now) == play(original, after, now)
    assert restored.export_state() == original.export_state()


@settings(max_examples=100, deadline=None)
@given(_definitions, st.lists(st.floats(0.0, 1.0), min_size=1, max_size=10))
def test_property_acknowledged_alarm_not_reannounced_after_restore(
    definition: FractionHighAlarm, later: list[float]
) -> None:
    engine = AlarmEngine([definition])
    run(engine, [1.0] * 4, step=10.0)  # 1.0 > every limit; 30 s >= every on_delay
    engine.acknowledge(PROBE, "pg_high", "anna", None, T0 + 31)
    assert state_of(engine) is ACK
    restored = AlarmEngine([definition], state=json.loads(json.dumps(engine.export_state())))
    limit = definition.limit - definition.deadband
    still_high = [v for v in later if v >= limit] or [1.0]
    assert run(restored, still_high, start=T0 + 40) == []
    assert state_of(restored) is ACK


# -- what the plant reads: the occurrence's text and times (issue 13) ----------------------


def test_trip_message_is_kept_for_the_occurrence_and_ack_keeps_the_raise_time() -> None:
    engine = AlarmEngine([high()])
    engine.evaluate(PROBE, snapshot(0.20), T0, last_frame_ts=T0)
    engine.evaluate(PROBE, snapshot(0.30), T0 + 5, last_frame_ts=T0 + 5)
    [status] = engine.alarm_states(PROBE)
    assert status.state is UNACK
    assert status.message == status.trip_message == "PG 20.0% above 10%"
    assert (status.trip_value, status.value) == (0.20, 0.30)
    assert status.active_since == status.state_since == T0
    assert (status.acknowledged_at, status.acknowledged_by) == (None, None)

    result = engine.acknowledge(PROBE, "pg_high", "ana", "seen", T0 + 60)
    assert result.accepted
    [status] = engine.alarm_states(PROBE)
    assert status.state is ACK
    assert status.active_since == T0  # the raise time stays
    assert status.state_since == T0 + 60
    assert (status.acknowledged_at, status.acknowledged_by) == (T0 + 60, "ana")
    assert status.message == "PG 20.0% above 10%"
    assert result.transitions[0].active_since == T0

    [back] = engine.evaluate(PROBE, snapshot(0.01), T0 + 70, last_frame_ts=T0 + 70)
    assert back.to_state is NORMAL
    assert back.message == "back to normal (was: PG 20.0% above 10%)"
    [status] = engine.alarm_states(PROBE)
    assert status.message == "normal"
    assert (status.active_since, status.trip_message, status.acknowledged_at) == (None,) * 3
    assert status.state_since == T0 + 70


def test_returned_and_latched_alarms_say_so_in_their_own_words() -> None:
    engine = AlarmEngine([high(), high(id="pg_latch", latching=True)])
    engine.evaluate(PROBE, snapshot(0.25), T0, last_frame_ts=T0)
    engine.evaluate(PROBE, snapshot(0.01), T0 + 5, last_frame_ts=T0 + 5)
    returned, latched = engine.alarm_states(PROBE)
    assert returned.state is RETURNED
    assert returned.message == "returned to normal, not acknowledged (was: PG 25.0% above 10%)"
    assert latched.state is UNACK and latched.latched
    assert latched.message == (
        "condition cleared, latched until acknowledged (was: PG 25.0% above 10%)"
    )
    # A second trip while returned is a new occurrence with its own time and text.
    engine.evaluate(PROBE, snapshot(0.40), T0 + 9, last_frame_ts=T0 + 9)
    again = engine.alarm_states(PROBE)[0]
    assert (again.state, again.active_since, again.message) == (UNACK, T0 + 9, "PG 40.0% above 10%")


def test_no_value_is_none_with_a_reason_never_nan() -> None:
    rising = RateOfChangeAlarm.model_validate(
        {
            "kind": "rate_of_change",
            "id": "pg_rising",
            "priority": "medium",
            "message": "PG share rising {value:.1%}/min",
            "class_name": "PG",
            "limit_per_min": 0.01,
            "direction": "rising",
        }
    )
    engine = AlarmEngine([high(), rising])
    engine.evaluate(PROBE, snapshot(None, n=0), T0, last_frame_ts=T0)
    text = json.dumps([s.to_json() for s in engine.alarm_states(PROBE)])
    assert "nan" not in text.lower()
    fraction, rate = engine.alarm_states(PROBE)
    assert (fraction.value, rate.value) == (None, None)
    assert fraction.value_reason == "0 particles in the 60 s window, 100 needed"
    assert rate.value_reason is not None and "trend" in rate.value_reason
    assert (fraction.message, rate.message) == ("normal", "normal")
    # A NaN from upstream counts as no value, not as a reading.
    engine.evaluate(PROBE, snapshot(math.nan), T0 + 1, last_frame_ts=T0 + 1)
    assert engine.alarm_states(PROBE)[0].value is None
    assert engine.alarm_states(PROBE)[0].state is NORMAL
