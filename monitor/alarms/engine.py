"""The alarm state machine: ISA-18.2 states, deadband, delays, shelving, suppression.

Pure logic. Every call takes `now` (epoch seconds) from the caller; nothing here reads a
clock, starts a thread or touches a file. The daemon feeds `observe_counts` per frame
and `evaluate` per snapshot, publishes what comes back, persists `drain_journal()` and
`export_state()`.

How an alarm moves, for one probe and one definition:

1. Reading. `read_alarm` gives the value and whether it is past the activation limit
   (`above`) or past the clearing limit, i.e. inside the limit by the deadband
   (`clear`). A reading without enough data changes nothing at all.
2. Hysteresis. `raw` turns true on `above`, false on `clear`, and keeps its value in
   the deadband, so a value oscillating inside the deadband never chatters.
3. Delays. `condition` follows `raw` once `raw` has differed from it for on_delay
   (turning on) or off_delay (turning off), measured from the first evaluation at which
   they differed; an evaluation where `raw` agrees with `condition` again restarts it.
4. States (ISA-18.2), driven by `condition` and operator acknowledgement:
   normal -> active_unacknowledged when the condition turns on;
   active_unacknowledged -> active_acknowledged on acknowledge;
   active_unacknowledged -> returned_unacknowledged when it turns off (not latching);
   active_acknowledged -> normal when it turns off;
   returned_unacknowledged -> normal on acknowledge;
   returned_unacknowledged -> active_unacknowledged when it turns on again.

Latching: a latching alarm never goes to returned_unacknowledged. It stays
active_unacknowledged (status `latched` true) when its condition clears, so it returns
to normal only once it has been acknowledged AND its condition is clear, in either
order: acknowledged while the condition still holds it goes to active_acknowledged and
returns with the condition as any alarm; acknowledged after the condition cleared it
goes active_unacknowledged -> active_acknowledged -> normal in the one call (the second
step journaled with cause "condition", since the condition is clear).

Shelving hides an alarm from operators for a time: its condition and state are still
tracked and journaled, but its transitions are not announced (`announced` False, not
returned). On expiry `evaluate` unshelves it and announces its current state.

Suppression by bad input: when a probe's input quality is BAD, its process alarms are
flagged `suppressed` and frozen (no condition processing, running delays restarted;
their value and state hold), so a blind probe never reads as "0 % PG, normal". Of its
diagnostic alarms, the first whose condition is past its limit now, in the order
probe_stale, image_quality, out_of_distribution, uncertain_high (then definition
order), stands and is evaluated as usual; the other diagnostic alarms are flagged
suppressed too and may clear but not activate, so one diagnostic alarm stands for the
one cause (a stale probe also empties the windows; it is not reported as bad images as
well). A BAD quality
passed by the caller with no diagnostic condition past its limit (e.g. probe cleaning)
suppresses the process alarms and leaves the diagnostic alarms running. Suppression is
journaled (events "suppress" / "unsuppress"), never announced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

from monitor.alarms.readings import (
    Quality,
    Reading,
    limit_of,
    quality_from_readings,
    read_alarm,
    unit_of,
    worst_quality,
)
from monitor.config.alarms import (
    DIAGNOSTIC_KINDS,
    SYSTEM_KINDS,
    AlarmDefinition,
    ShiftAlarm,
    ensure_unique_ids,
    format_message,
    is_diagnostic,
    severity_of,
)

STATE_VERSION = 1
"""Version of the `export_state` layout."""

DEFAULT_MAX_SHELVE_S = 8 * 3600.0


class AlarmState(StrEnum):
    """ISA-18.2 alarm states (shelved and suppressed are flags on top of these)."""

    NORMAL = "normal"
    ACTIVE_UNACKNOWLEDGED = "active_unacknowledged"
    ACTIVE_ACKNOWLEDGED = "active_acknowledged"
    RETURNED_UNACKNOWLEDGED = "returned_unacknowledged"


Cause = Literal["condition", "acknowledge", "shelve", "unshelve", "shelve_expired", "restore"]
JournalEvent = Literal[
    "transition", "acknowledge", "shelve", "unshelve", "suppress", "unsuppress", "comment"
]

_NORMAL = AlarmState.NORMAL
_UNACK = AlarmState.ACTIVE_UNACKNOWLEDGED
_ACK = AlarmState.ACTIVE_ACKNOWLEDGED
_RETURNED = AlarmState.RETURNED_UNACKNOWLEDGED
_MARKERS: frozenset[Cause] = frozenset({"shelve", "unshelve", "shelve_expired", "restore"})

_TRANSITION_TABLE: dict[tuple[AlarmState, AlarmState], frozenset[Cause]] = {
    (_NORMAL, _UNACK): frozenset({"condition"}),
    (_UNACK, _ACK): frozenset({"acknowledge"}),
    (_UNACK, _RETURNED): frozenset({"condition"}),
    (_ACK, _NORMAL): frozenset({"condition"}),
    (_RETURNED, _NORMAL): frozenset({"acknowledge"}),
    (_RETURNED, _UNACK): frozenset({"condition"}),
}
_TRANSITION_TABLE.update({(state, state): _MARKERS for state in AlarmState})
ALLOWED_TRANSITIONS: Mapping[tuple[AlarmState, AlarmState], frozenset[Cause]] = MappingProxyType(
    _TRANSITION_TABLE
)
"""(from_state, to_state) -> causes that may move an alarm so. Pairs with from == to are
markers that change no state: shelving, unshelving, shelve expiry, restore."""


@dataclass(frozen=True)
class Transition:
    """One alarm changing state, or a marker (shelve, restore, ...) on its current state."""

    probe: str
    alarm_id: str
    kind: str
    priority: str
    severity: int
    from_state: AlarmState
    to_state: AlarmState
    value: float | None
    limit: float
    message: str
    ts: float
    cause: Cause
    announced: bool
    """False while shelved, and for restore markers: journaled, not shown to operators."""
    who: str | None = None
    """The operator, for transitions caused by an operator action."""
    active_since: float | None = None
    """When the occurrence was raised (None once back to normal)."""
    unit: str = "fraction"
    """Of value and limit (see AlarmStatus.unit)."""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return {
            "probe": self.probe,
            "alarm_id": self.alarm_id,
            "kind": self.kind,
            "priority": self.priority,
            "severity": self.severity,
            "from_state": str(self.from_state),
            "to_state": str(self.to_state),
            "value": self.value,
            "limit": self.limit,
            "unit": self.unit,
            "message": self.message,
            "ts": self.ts,
            "cause": self.cause,
            "announced": self.announced,
            "who": self.who,
            "active_since": self.active_since,
        }


@dataclass(frozen=True)
class ActionResult:
    """Outcome of an operator action; `transitions` are the announced ones it caused."""

    accepted: bool
    reason: str | None = None
    transitions: tuple[Transition, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "transitions": [t.to_json() for t in self.transitions],
        }


@dataclass(frozen=True)
class JournalEntry:
    """One line of the alarm journal: a transition, an operator action or a suppression."""

    ts: float
    probe: str
    alarm_id: str
    event: JournalEvent
    accepted: bool = True
    """False for a refused operator action."""
    reason: str | None = None
    """Why an action was refused."""
    who: str | None = None
    comment: str | None = None
    transition: Transition | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return {
            "ts": self.ts,
            "probe": self.probe,
            "alarm_id": self.alarm_id,
            "event": self.event,
            "accepted": self.accepted,
            "reason": self.reason,
            "who": self.who,
            "comment": self.comment,
            "transition": None if self.transition is None else self.transition.to_json(),
        }


@dataclass(frozen=True)
class AlarmStatus:
    """Where one alarm of one probe stands now: what MQTT retains and OPC UA shows."""

    probe: str
    alarm_id: str
    kind: str
    category: Literal["process", "diagnostic", "system"]
    priority: str
    severity: int
    state: AlarmState
    active: bool
    acknowledged: bool
    latched: bool
    """Active only because it latches: the condition has cleared, no acknowledgement yet."""
    shelved: bool
    shelved_until: float | None
    shelved_by: str | None
    suppressed: bool
    message: str
    """Operator text for the current state; see `state_message`."""
    trip_message: str | None
    """The text rendered when this occurrence was raised (None while normal)."""
    trip_value: float | None
    """The value at the raise (None while normal)."""
    value: float | None
    """Last value with enough data (held while suppressed or short of data)."""
    value_reason: str | None
    """Why the latest evaluation had no value (too few particles, ...), else None."""
    limit: float
    unit: str
    """Of value, trip_value and limit: fraction (0-1), fraction/min, s, ..."""
    active_since: float | None
    """When this occurrence was raised (None while normal); an acknowledge keeps it."""
    state_since: float | None
    """When the alarm entered `state`; None if it never changed state."""
    acknowledged_at: float | None
    acknowledged_by: str | None
    """Who acknowledged this occurrence and when (None until then, and while normal)."""
    quality: Quality | None
    """The probe's input quality at the last evaluation."""
    shelved_one_shot: bool = False
    """Shelved until it is no longer active (OPC UA OneShotShelve), not only for a time."""
    operator: str | None = None
    """Who acted on this occurrence last (acknowledge, shelve, unshelve, comment)."""
    comment: str | None = None
    """The last non-empty comment given with such an action (None until one)."""
    comment_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        return {
            "probe": self.probe,
            "alarm_id": self.alarm_id,
            "kind": self.kind,
            "category": self.category,
            "priority": self.priority,
            "severity": self.severity,
            "state": str(self.state),
            "active": self.active,
            "acknowledged": self.acknowledged,
            "latched": self.latched,
            "shelved": self.shelved,
            "shelved_until": self.shelved_until,
            "shelved_by": self.shelved_by,
            "suppressed": self.suppressed,
            "message": self.message,
            "trip_message": self.trip_message,
            "trip_value": self.trip_value,
            "value": self.value,
            "value_reason": self.value_reason,
            "limit": self.limit,
            "unit": self.unit,
            "active_since": self.active_since,
            "state_since": self.state_since,
            "acknowledged_at": self.acknowledged_at,
            "acknowledged_by": self.acknowledged_by,
            "quality": self.quality,
            "shelved_one_shot": self.shelved_one_shot,
            "operator": self.operator,
            "comment": self.comment,
            "comment_at": self.comment_at,
        }


@dataclass
class _Alarm:
    """Mutable state of one definition on one probe."""

    definition: AlarmDefinition
    state: AlarmState = AlarmState.NORMAL
    raw: bool = False
    """Condition after hysteresis, before the delays."""
    condition: bool = False
    """Condition after hysteresis and delays: what drives the state."""
    pending_since: float | None = None
    """When `raw` started to differ from `condition`."""
    since: float | None = None
    """When `state` was entered."""
    value: float | None = None
    value_reason: str | None = None
    active_since: float | None = None
    trip_message: str | None = None
    trip_value: float | None = None
    acknowledged_at: float | None = None
    acknowledged_by: str | None = None
    shelved_until: float | None = None
    shelved_by: str | None = None
    shelve_comment: str | None = None
    shelved_one_shot: bool = False
    """Shelved until the alarm is no longer active (OPC UA OneShotShelve)."""
    operator: str | None = None
    comment: str | None = None
    comment_at: float | None = None
    """Who acted last on this occurrence, and the last comment given (see AlarmStatus)."""
    suppressed: bool = False
    cusum: float = 0.0
    cusum_from: float | None = None
    """Frames before this time are ignored by the CUSUM (set by `reset_shift`)."""

    def export(self) -> dict[str, Any]:
        return {
            "kind": self.definition.kind,
            "state": str(self.state),
            "raw": self.raw,
            "condition": self.condition,
            "pending_since": self.pending_since,
            "since": self.since,
            "value": self.value,
            "value_reason": self.value_reason,
            "active_since": self.active_since,
            "trip_message": self.trip_message,
            "trip_value": self.trip_value,
            "acknowledged_at": self.acknowledged_at,
            "acknowledged_by": self.acknowledged_by,
            "shelved_until": self.shelved_until,
            "shelved_by": self.shelved_by,
            "shelve_comment": self.shelve_comment,
            "shelved_one_shot": self.shelved_one_shot,
            "operator": self.operator,
            "comment": self.comment,
            "comment_at": self.comment_at,
            "suppressed": self.suppressed,
            "cusum": self.cusum,
            "cusum_from": self.cusum_from,
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.state = AlarmState(saved["state"])
        self.raw = bool(saved["raw"])
        self.condition = bool(saved["condition"])
        self.pending_since = _optional_float(saved.get("pending_since"))
        self.since = _optional_float(saved.get("since"))
        self.value = _optional_float(saved.get("value"))
        self.value_reason = saved.get("value_reason")
        # Absent in state saved before issue 13: the occurrence starts at the state change.
        self.active_since = _optional_float(saved.get("active_since"))
        self.trip_message = saved.get("trip_message")
        self.trip_value = _optional_float(saved.get("trip_value"))
        self.acknowledged_at = _optional_float(saved.get("acknowledged_at"))
        self.acknowledged_by = saved.get("acknowledged_by")
        if self.state is not AlarmState.NORMAL and self.active_since is None:
            self.active_since = self.since
        self.shelved_until = _optional_float(saved.get("shelved_until"))
        self.shelved_by = saved.get("shelved_by")
        self.shelve_comment = saved.get("shelve_comment")
        self.shelved_one_shot = bool(saved.get("shelved_one_shot", False))
        self.operator = saved.get("operator")
        self.comment = saved.get("comment")
        self.comment_at = _optional_float(saved.get("comment_at"))
        self.suppressed = bool(saved.get("suppressed", False))
        self.cusum = float(saved.get("cusum", 0.0))
        self.cusum_from = _optional_float(saved.get("cusum_from"))


@dataclass
class _Probe:
    alarms: dict[str, _Alarm]
    watching_since: float | None = None
    """First evaluation of this probe: a probe that never sent a frame is stale from here."""
    quality: Quality | None = None
    restored: bool = False
    """Restored from saved state and not evaluated since: journal restore markers."""


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _diagnostic_rank(alarm: _Alarm, order: int) -> tuple[int, int]:
    return DIAGNOSTIC_KINDS.index(alarm.definition.kind), order


class AlarmEngine:
    """Alarms of many probes over one list of definitions.

    A definition with `probes=()` applies to every probe the engine is given. `state` is
    a previous `export_state()`: states, acknowledgements, running delays, shelving and
    CUSUM sums carry over, so an acknowledged alarm is not announced again after a
    restart. Saved alarms whose definition is gone or changed kind are dropped.
    """

    def __init__(
        self,
        definitions: Sequence[AlarmDefinition],
        *,
        state: Mapping[str, Any] | None = None,
        max_shelve_s: float = DEFAULT_MAX_SHELVE_S,
    ) -> None:
        ensure_unique_ids(definitions)
        if not (math.isfinite(max_shelve_s) and max_shelve_s > 0):
            raise ValueError(f"max_shelve_s must be positive seconds, got {max_shelve_s}")
        self.definitions: tuple[AlarmDefinition, ...] = tuple(definitions)
        self.max_shelve_s = float(max_shelve_s)
        self._probes: dict[str, _Probe] = {}
        self._journal: list[JournalEntry] = []
        self._listed_probes = {p for d in self.definitions for p in d.probes}
        if state is not None:
            self._restore(state)

    # -- feeding -------------------------------------------------------------------

    def observe_counts(
        self, probe: str, ts: float, class_counts_by_name: Mapping[str, int]
    ) -> None:
        """Feed one frame's confident particle counts per class to the shift (CUSUM) alarms.

        The frame is processed as a batch of n Bernoulli trials (n = all confident
        particles, k of them of the alarm's class): S += k·ln(p1/p0) +
        (n-k)·ln((1-p1)/(1-p0)), then clamped to [0, max_sum]. Uncertain particles are
        not trials; leave them out. Rejected frames carry no counts and change nothing.
        """
        counts = dict(class_counts_by_name)
        if any(c < 0 for c in counts.values()):
            raise ValueError(f"particle counts must be non-negative, got {counts}")
        n = sum(counts.values())
        for alarm in self._probe(probe).alarms.values():
            definition = alarm.definition
            if not isinstance(definition, ShiftAlarm) or n == 0:
                continue
            if alarm.cusum_from is not None and ts < alarm.cusum_from:
                continue
            k = counts.get(definition.class_name, 0)
            inc_class, inc_other = definition.increments
            step = k * inc_class + (n - k) * inc_other
            alarm.cusum = min(definition.ceiling, max(0.0, alarm.cusum + step))

    def reset_shift(self, probe: str, ts: float) -> None:
        """Restart the probe's CUSUM sums at 0 (new batch); frames before `ts` are ignored."""
        for alarm in self._probe(probe).alarms.values():
            if isinstance(alarm.definition, ShiftAlarm):
                alarm.cusum = 0.0
                alarm.cusum_from = ts

    def evaluate(
        self,
        probe: str,
        snapshot_json: Mapping[str, Any],
        now: float,
        *,
        last_frame_ts: float | None,
        quality: Quality | None = None,
    ) -> list[Transition]:
        """Evaluate every alarm of `probe` on a `ProbeSnapshot.to_json()` taken at `now`.

        `last_frame_ts`: newest frame of any kind from the probe (None: none yet).
        `quality`: the caller's view of the input (e.g. BAD while the probe is cleaned);
        the engine also rates it with `quality_of` and uses the worse of the two.
        Returns the transitions to announce; every transition, announced or not, also
        goes to the journal.
        """
        entry = self._probe(probe)
        if entry.watching_since is None:
            entry.watching_since = now
        announced: list[Transition] = []
        if entry.restored:
            entry.restored = False
            for alarm in entry.alarms.values():
                if alarm.state is not _NORMAL or alarm.shelved_until is not None:
                    self._mark(probe, alarm, "restore", now, announced=False)
        for alarm in entry.alarms.values():
            if alarm.shelved_until is not None and now >= alarm.shelved_until:
                self._clear_shelve(alarm)
                announced.append(self._mark(probe, alarm, "shelve_expired", now, announced=True))

        readings = {
            alarm_id: read_alarm(
                alarm.definition,
                snapshot_json,
                now,
                last_frame_ts=last_frame_ts,
                watching_since=entry.watching_since,
                cusum=alarm.cusum,
            )
            for alarm_id, alarm in entry.alarms.items()
        }
        computed = quality_from_readings(
            (alarm.definition, readings[alarm_id]) for alarm_id, alarm in entry.alarms.items()
        )
        effective = worst_quality(quality, computed)
        entry.quality = effective
        standing = self._standing_diagnostic(entry, readings) if effective == "BAD" else None

        for alarm_id, alarm in entry.alarms.items():
            diagnostic = is_diagnostic(alarm.definition)
            suppressed = (
                effective == "BAD"
                and alarm.definition.kind not in SYSTEM_KINDS
                and (not diagnostic or (standing is not None and alarm is not standing))
            )
            if suppressed != alarm.suppressed:
                alarm.suppressed = suppressed
                self._journal.append(
                    JournalEntry(
                        ts=now,
                        probe=probe,
                        alarm_id=alarm_id,
                        event="suppress" if suppressed else "unsuppress",
                        comment=f"input quality {effective}",
                    )
                )
            if suppressed and not diagnostic:
                # Frozen: the state holds and a delay must run again in full afterwards.
                alarm.pending_since = None
                continue
            reading = readings[alarm_id]
            if reading.value is None or not math.isfinite(reading.value):
                alarm.value_reason = reading.reason or "the value cannot be computed"
                continue
            alarm.value = reading.value
            alarm.value_reason = None
            self._follow_condition(alarm, reading, now, may_activate=not suppressed)
            transition = self._step(probe, alarm, now)
            if transition is not None and transition.announced:
                announced.append(transition)
            if alarm.shelved_one_shot and alarm.state in (_RETURNED, _NORMAL):
                # A one-shot shelve ends when the alarm is no longer active.
                self._clear_shelve(alarm)
                announced.append(self._mark(probe, alarm, "unshelve", now, announced=True))
        return announced

    # -- operator actions ----------------------------------------------------------

    def acknowledge(
        self, probe: str, alarm_id: str, who: str, comment: str | None, now: float
    ) -> ActionResult:
        """Acknowledge an unacknowledged alarm (active or returned)."""
        alarm, reason = self._target(probe, alarm_id, who)
        if alarm is not None and alarm.state not in (_UNACK, _RETURNED):
            reason = (
                f"alarm {alarm_id!r} of probe {probe!r} is {alarm.state}: only an "
                "unacknowledged alarm can be acknowledged"
            )
        if alarm is None or reason is not None:
            return self._refuse(
                "acknowledge", probe, alarm_id, who=who, comment=comment, now=now, reason=reason
            )
        self._accept("acknowledge", probe, alarm_id, who=who, comment=comment, now=now)
        to_state = _ACK if alarm.state is _UNACK else _NORMAL
        done = [self._move(probe, alarm, to_state, "acknowledge", now=now, who=who)]
        follow = self._step(probe, alarm, now)  # a latched alarm whose condition cleared
        if follow is not None:
            done.append(follow)
        return ActionResult(True, None, tuple(t for t in done if t.announced))

    def shelve(  # noqa: PLR0917 - acknowledge's order with the duration added
        self,
        probe: str,
        alarm_id: str,
        duration_s: float,
        who: str,
        comment: str | None,
        now: float,
        *,
        one_shot: bool = False,
    ) -> ActionResult:
        """Hide an alarm from operators until now + duration_s (at most max_shelve_s).

        Shelving a shelved alarm again sets a new expiry. `one_shot` (OPC UA's
        OneShotShelve): only an active alarm, shelved until it is no longer active, at
        most duration_s or max_shelve_s, whichever is shorter.
        """
        alarm, reason = self._target(probe, alarm_id, who)
        if reason is None and not (math.isfinite(duration_s) and duration_s > 0):
            reason = f"shelve duration must be a positive number of seconds, got {duration_s}"
        if alarm is not None and reason is None and one_shot:
            duration_s = min(duration_s, self.max_shelve_s)
            if alarm.state not in (_UNACK, _ACK):
                reason = (
                    f"alarm {alarm_id!r} of probe {probe!r} is {alarm.state}: only an active "
                    "alarm can be shelved until it clears"
                )
        if reason is None and duration_s > self.max_shelve_s:
            reason = (
                f"shelve for {duration_s:g}s refused: the longest allowed is "
                f"{self.max_shelve_s:g}s ({self.max_shelve_s / 3600:g} h); ask for less"
            )
        if alarm is None or reason is not None:
            return self._refuse(
                "shelve", probe, alarm_id, who=who, comment=comment, now=now, reason=reason
            )
        self._accept("shelve", probe, alarm_id, who=who, comment=comment, now=now)
        alarm.shelved_until = now + duration_s
        alarm.shelved_by = who
        alarm.shelve_comment = comment
        alarm.shelved_one_shot = one_shot
        marker = self._mark(probe, alarm, "shelve", now, announced=True, who=who)
        return ActionResult(True, None, (marker,))

    def unshelve(
        self, probe: str, alarm_id: str, who: str, comment: str | None, now: float
    ) -> ActionResult:
        """End shelving now; the alarm's current state is announced again."""
        alarm, reason = self._target(probe, alarm_id, who)
        if alarm is not None and reason is None and alarm.shelved_until is None:
            reason = f"alarm {alarm_id!r} of probe {probe!r} is not shelved"
        if alarm is None or reason is not None:
            return self._refuse(
                "unshelve", probe, alarm_id, who=who, comment=comment, now=now, reason=reason
            )
        self._accept("unshelve", probe, alarm_id, who=who, comment=comment, now=now)
        self._clear_shelve(alarm)
        marker = self._mark(probe, alarm, "unshelve", now, announced=True, who=who)
        return ActionResult(True, None, (marker,))

    def add_comment(
        self, probe: str, alarm_id: str, who: str, comment: str, now: float
    ) -> ActionResult:
        """Put an operator's comment on an alarm in the journal (OPC UA AddComment); no
        state changes."""
        alarm, reason = self._target(probe, alarm_id, who)
        if reason is None and not comment.strip():
            reason = "the comment is empty: write what should go on record"
        if alarm is None or reason is not None:
            return self._refuse(
                "comment", probe, alarm_id, who=who, comment=comment, now=now, reason=reason
            )
        self._accept("comment", probe, alarm_id, who=who, comment=comment, now=now)
        return ActionResult(True)

    # -- reading -------------------------------------------------------------------

    @property
    def probes(self) -> tuple[str, ...]:
        """Probes the engine has state for, in the order first seen."""
        return tuple(self._probes)

    def input_quality(self, probe: str) -> Quality | None:
        """The probe's input quality as the last `evaluate` rated it (None before the first):
        the one figure that publishers, the dashboard and alarm suppression all use."""
        entry = self._probes.get(probe)
        return None if entry is None else entry.quality

    def alarm_states(self, probe: str) -> list[AlarmStatus]:
        """Status of every alarm of `probe`, in definition order (empty for an unknown probe)."""
        entry = self._probes.get(probe)
        if entry is None:
            return []
        return [self._status(probe, entry, alarm) for alarm in entry.alarms.values()]

    def reconfigured(
        self, definitions: Sequence[AlarmDefinition], *, max_shelve_s: float
    ) -> AlarmEngine:
        """A new engine over `definitions` that carries on where this one is (a live
        config reload): states, acknowledgements, shelving, delays and the undrained
        journal move over, and nothing is re-announced. An alarm whose definition is
        gone, or changed kind, is dropped; a changed limit applies from the next
        evaluation. This engine must not be used afterwards."""
        engine = AlarmEngine(definitions, state=self.export_state(), max_shelve_s=max_shelve_s)
        for entry in engine._probes.values():
            entry.restored = False  # a reload is no restart: no restore markers
        engine._journal = self._journal
        self._journal = []
        return engine

    def drain_journal(self) -> list[JournalEntry]:
        """Journal entries since the last drain, oldest first; the engine forgets them."""
        entries, self._journal = self._journal, []
        return entries

    def export_state(self) -> dict[str, Any]:
        """Everything needed to resume after a restart, as plain JSON-able values."""
        return {
            "version": STATE_VERSION,
            "probes": {
                name: {
                    "watching_since": entry.watching_since,
                    "quality": entry.quality,
                    "alarms": {
                        alarm_id: alarm.export() for alarm_id, alarm in entry.alarms.items()
                    },
                }
                for name, entry in self._probes.items()
            },
        }

    # -- internals -----------------------------------------------------------------

    def _probe(self, probe: str) -> _Probe:
        entry = self._probes.get(probe)
        if entry is None:
            entry = _Probe(
                alarms={d.id: _Alarm(d) for d in self.definitions if d.applies_to(probe)}
            )
            self._probes[probe] = entry
        return entry

    def _restore(self, state: Mapping[str, Any]) -> None:
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"saved alarm state has version {version!r}, this engine reads "
                f"{STATE_VERSION}; delete the saved state to start from normal"
            )
        for name, saved in state.get("probes", {}).items():
            entry = self._probe(name)
            entry.watching_since = _optional_float(saved.get("watching_since"))
            entry.quality = saved.get("quality")
            for alarm_id, saved_alarm in saved.get("alarms", {}).items():
                alarm = entry.alarms.get(alarm_id)
                if alarm is None or alarm.definition.kind != saved_alarm.get("kind"):
                    continue
                alarm.restore(saved_alarm)
            entry.restored = True

    def _standing_diagnostic(self, entry: _Probe, readings: Mapping[str, Reading]) -> _Alarm | None:
        """The one diagnostic alarm evaluated while the input is BAD (see module doc)."""
        candidates = [
            (_diagnostic_rank(alarm, order), alarm)
            for order, (alarm_id, alarm) in enumerate(entry.alarms.items())
            if is_diagnostic(alarm.definition) and readings[alarm_id].above
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda pair: pair[0])[1]

    @staticmethod
    def _follow_condition(
        alarm: _Alarm, reading: Reading, now: float, *, may_activate: bool
    ) -> None:
        if reading.above:
            alarm.raw = True
        elif reading.clear:
            alarm.raw = False
        if alarm.raw == alarm.condition or (alarm.raw and not may_activate):
            alarm.pending_since = None
            return
        if alarm.pending_since is None:
            alarm.pending_since = now
        definition = alarm.definition
        delay = definition.on_delay if alarm.raw else definition.off_delay
        if now - alarm.pending_since >= delay:
            alarm.condition = alarm.raw
            alarm.pending_since = None

    def _step(self, probe: str, alarm: _Alarm, now: float) -> Transition | None:
        """The transition the condition calls for from the current state, if any."""
        state, condition = alarm.state, alarm.condition
        to_state: AlarmState | None = None
        if state is _NORMAL and condition:
            to_state = _UNACK
        elif state is _UNACK and not condition and not alarm.definition.latching:
            to_state = _RETURNED
        elif state is _ACK and not condition:
            to_state = _NORMAL
        elif state is _RETURNED and condition:
            to_state = _UNACK
        if to_state is None:
            return None
        return self._move(probe, alarm, to_state, "condition", now=now)

    def _transition(
        self,
        probe: str,
        alarm: _Alarm,
        to_state: AlarmState,
        cause: Cause,
        now: float,
        *,
        announced: bool,
        who: str | None,
    ) -> Transition:
        definition = alarm.definition
        limit = limit_of(definition)
        from_state = alarm.state
        was = alarm.trip_message
        if to_state is not from_state:
            alarm.state = to_state
            alarm.since = now
        if to_state is _UNACK and from_state in (_NORMAL, _RETURNED):
            # A new occurrence: its text and value are fixed now, whatever the value does next.
            alarm.active_since = now
            alarm.trip_value = alarm.value
            alarm.trip_message = _trip_text(alarm)
            alarm.acknowledged_at = alarm.acknowledged_by = None
            alarm.operator = alarm.comment = None
            alarm.comment_at = None
        elif cause == "acknowledge":
            alarm.acknowledged_at = now
            alarm.acknowledged_by = who
        if to_state is _NORMAL and from_state is not _NORMAL:
            message = f"back to normal (was: {was or _trip_text(alarm)})"
            alarm.active_since = alarm.trip_value = None
            alarm.trip_message = None
            alarm.acknowledged_at = alarm.acknowledged_by = None
        else:
            message = state_message(alarm)
        transition = Transition(
            probe=probe,
            alarm_id=definition.id,
            kind=definition.kind,
            priority=definition.priority,
            severity=severity_of(definition.priority),
            from_state=from_state,
            to_state=to_state,
            value=alarm.value,
            limit=limit,
            message=message,
            ts=now,
            cause=cause,
            announced=announced,
            who=who,
            active_since=alarm.active_since,
            unit=unit_of(definition),
        )
        self._journal.append(
            JournalEntry(
                ts=now,
                probe=probe,
                alarm_id=definition.id,
                event="transition",
                who=who,
                transition=transition,
            )
        )
        return transition

    def _move(
        self,
        probe: str,
        alarm: _Alarm,
        to_state: AlarmState,
        cause: Cause,
        *,
        now: float,
        who: str | None = None,
    ) -> Transition:
        announced = alarm.shelved_until is None
        return self._transition(probe, alarm, to_state, cause, now, announced=announced, who=who)

    def _mark(
        self,
        probe: str,
        alarm: _Alarm,
        cause: Cause,
        now: float,
        *,
        announced: bool,
        who: str | None = None,
    ) -> Transition:
        return self._transition(probe, alarm, alarm.state, cause, now, announced=announced, who=who)

    @staticmethod
    def _clear_shelve(alarm: _Alarm) -> None:
        alarm.shelved_until = None
        alarm.shelved_by = None
        alarm.shelve_comment = None
        alarm.shelved_one_shot = False

    def _target(self, probe: str, alarm_id: str, who: str) -> tuple[_Alarm | None, str | None]:
        """The alarm an action names, or the reason it cannot be acted on."""
        if not who or not who.strip():
            return None, "who is required: name the operator taking the action"
        if probe not in self._probes and probe not in self._listed_probes:
            known = sorted(set(self._probes) | self._listed_probes)
            return None, f"unknown probe {probe!r} (known: {known})"
        alarm = self._probe(probe).alarms.get(alarm_id)
        if alarm is None:
            known = list(self._probe(probe).alarms)
            return None, f"unknown alarm {alarm_id!r} for probe {probe!r} (known: {known})"
        return alarm, None

    def _accept(
        self,
        event: JournalEvent,
        probe: str,
        alarm_id: str,
        *,
        who: str,
        comment: str | None,
        now: float,
    ) -> None:
        self._journal.append(
            JournalEntry(
                ts=now, probe=probe, alarm_id=alarm_id, event=event, who=who, comment=comment
            )
        )
        alarm = self._probe(probe).alarms[alarm_id]
        alarm.operator = who
        if comment and comment.strip():
            alarm.comment, alarm.comment_at = comment, now

    def _refuse(
        self,
        event: JournalEvent,
        probe: str,
        alarm_id: str,
        *,
        who: str,
        comment: str | None,
        now: float,
        reason: str | None,
    ) -> ActionResult:
        reason = reason or "refused"
        self._journal.append(
            JournalEntry(
                ts=now,
                probe=probe,
                alarm_id=alarm_id,
                event=event,
                accepted=False,
                reason=reason,
                who=who,
                comment=comment,
            )
        )
        return ActionResult(False, reason)

    @staticmethod
    def _status(probe: str, entry: _Probe, alarm: _Alarm) -> AlarmStatus:
        definition = alarm.definition
        limit = limit_of(definition)
        active = alarm.state in (_UNACK, _ACK)
        return AlarmStatus(
            probe=probe,
            alarm_id=definition.id,
            kind=definition.kind,
            category=(
                "system"
                if definition.kind in SYSTEM_KINDS
                else "diagnostic"
                if is_diagnostic(definition)
                else "process"
            ),
            priority=definition.priority,
            severity=severity_of(definition.priority),
            state=alarm.state,
            active=active,
            acknowledged=alarm.state in (_NORMAL, _ACK),
            latched=definition.latching and alarm.state is _UNACK and not alarm.condition,
            shelved=alarm.shelved_until is not None,
            shelved_until=alarm.shelved_until,
            shelved_by=alarm.shelved_by,
            suppressed=alarm.suppressed,
            message=state_message(alarm),
            trip_message=alarm.trip_message,
            trip_value=alarm.trip_value,
            value=alarm.value,
            value_reason=alarm.value_reason,
            limit=limit,
            unit=unit_of(definition),
            active_since=alarm.active_since,
            state_since=alarm.since,
            acknowledged_at=alarm.acknowledged_at,
            acknowledged_by=alarm.acknowledged_by,
            quality=entry.quality,
            shelved_one_shot=alarm.shelved_one_shot,
            operator=alarm.operator,
            comment=alarm.comment,
            comment_at=alarm.comment_at,
        )


def _trip_text(alarm: _Alarm) -> str:
    """The definition's message with the alarm's value; its id when no value is known
    (a state restored from before issue 13)."""
    value = alarm.trip_value if alarm.trip_value is not None else alarm.value
    if value is None or not math.isfinite(value):
        return f"{alarm.definition.id} active"
    return format_message(alarm.definition.message, value, limit_of(alarm.definition))


def state_message(alarm: _Alarm) -> str:
    """What an operator reads for the alarm's current state: the occurrence's trip text
    while it is active or returned, never the live value in trip wording."""
    if alarm.state is _NORMAL:
        return "normal"
    trip = alarm.trip_message or _trip_text(alarm)
    if alarm.state is _RETURNED:
        return f"returned to normal, not acknowledged (was: {trip})"
    if alarm.state is _UNACK and alarm.definition.latching and not alarm.condition:
        return f"condition cleared, latched until acknowledged (was: {trip})"
    return trip
