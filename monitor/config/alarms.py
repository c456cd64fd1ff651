"""Alarm definitions: what to watch, the limit, and how the alarm behaves.

One pydantic model per alarm kind, joined in the `AlarmDefinition` union discriminated by
`kind`. Process alarms watch the crystallisation (class fractions, their rate of change,
a CUSUM shift detector); diagnostic alarms watch the probe itself (no frames, frames
rejected, particles uncertain) and stand in for the process alarms while the probe is
blind. Validation is pure: whether a window is one of the aggregation windows or a class
is in the model manifest is checked by `check_definitions` against values the caller
passes in.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

from monitor.config.durations import Duration
from monitor.config.fractions import Fraction

Priority = Literal["low", "medium", "high", "critical"]

_SEVERITY: dict[str, int] = {"low": 250, "medium": 500, "high": 750, "critical": 1000}

PROCESS_KINDS: frozenset[str] = frozenset(
    {"fraction_high", "fraction_low", "rate_of_change", "shift"}
)
"""Kinds that watch the process; suppressed while the probe's input is BAD."""
DIAGNOSTIC_KINDS: tuple[str, ...] = (
    "probe_stale",
    "image_quality",
    "out_of_distribution",
    "uncertain_high",
)
SYSTEM_KINDS: frozenset[str] = frozenset({"publish_overflow"})  # never suppressed by input
"""Kinds that watch the probe, in the order that decides which one stands when the input
is BAD for more than one reason (a stale probe explains rejected frames, not the reverse)."""

_ALLOWED_PLACEHOLDERS = frozenset({"value", "limit"})


def severity_of(priority: Priority) -> int:
    """OPC UA event severity (1-1000) of an alarm priority: 250, 500, 750 or 1000."""
    return _SEVERITY[priority]


def format_message(template: str, value: float, limit: float) -> str:
    """The alarm text with `{value}` and `{limit}` filled in (the engine renders it once,
    when an alarm trips, with a value that exists)."""
    return template.format(value=value, limit=limit)


class _Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Alarm id, unique among all alarms; letters, digits, '_' and '-'.",
    )
    priority: Priority = Field(
        description="low, medium, high or critical (OPC UA severity 250/500/750/1000)."
    )
    message: str = Field(
        min_length=1,
        description="Operator text; may use {value} and {limit} with a format spec, "
        "e.g. 'PG {value:.1%} above {limit:.0%}'.",
    )
    latching: bool = Field(
        default=False,
        description="Once active, stay active until acknowledged AND the condition cleared.",
    )
    on_delay: Duration = Field(
        default=0.0, description="The condition must hold this long before the alarm activates."
    )
    off_delay: Duration = Field(
        default=0.0, description="The condition must be clear this long before the alarm clears."
    )
    probes: tuple[Annotated[str, Field(min_length=1)], ...] = Field(
        default=(), description="Probe ids this alarm applies to; empty: every probe."
    )

    @field_validator("message")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"message is not a valid format string: {exc}") from None
        unknown = names - _ALLOWED_PLACEHOLDERS
        if unknown:
            raise ValueError(
                f"message may only use {{value}} and {{limit}}, got {sorted(unknown)} "
                "(write a literal brace as '{{' or '}}')"
            )
        try:
            value.format(value=0.5, limit=0.5)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"message format spec does not fit a number: {exc}") from None
        return value

    def applies_to(self, probe: str) -> bool:
        """True when this alarm watches `probe`."""
        return not self.probes or probe in self.probes


def _whole_seconds(value: float) -> float:
    if not (value > 0 and float(value).is_integer()):
        raise ValueError(
            f"window must be a whole number of seconds > 0 (one of aggregation.windows), "
            f"got {value}"
        )
    return value


WindowSeconds = Annotated[Duration, AfterValidator(_whole_seconds)]
"""A window length: whole seconds, the key of a snapshot's window ("60", "300", ...)."""

_Fraction = Fraction  # 0-1; above 1 the message says that 0.15 means 15 %


class _FractionAlarm(_Definition):
    class_name: str = Field(min_length=1, description="Class name from the model manifest.")
    window: WindowSeconds = Field(description="Aggregation window (one of aggregation.windows).")
    limit: _Fraction = Field(description="Class fraction limit, 0-1.")
    deadband: _Fraction = Field(
        default=0.01, description="Hysteresis: the alarm clears only this far inside the limit."
    )
    min_count: int = Field(
        default=100,
        ge=0,
        description="Confident particles needed in the window; fewer is 'not enough data' "
        "and the alarm holds its state.",
    )
    use_adjusted: bool = Field(
        default=False,
        description="Watch the confusion-adjusted share instead of the raw fraction.",
    )


class FractionHighAlarm(_FractionAlarm):
    """Class fraction above `limit`; clears below `limit - deadband`."""

    kind: Literal["fraction_high"] = Field(
        description="fraction_high: a class fraction above limit; clears below limit - deadband."
    )


class FractionLowAlarm(_FractionAlarm):
    """Class fraction below `limit`; clears above `limit + deadband`."""

    kind: Literal["fraction_low"] = Field(
        description="fraction_low: a class fraction below limit; clears above limit + deadband."
    )


class RateOfChangeAlarm(_Definition):
    """The class fraction moves faster than `limit_per_min` (the snapshot's trend slope)."""

    kind: Literal["rate_of_change"] = Field(
        description="rate_of_change: a class fraction moving faster than limit_per_min."
    )
    class_name: str = Field(min_length=1, description="Class name from the model manifest.")
    limit_per_min: Annotated[Fraction, Field(gt=0)] = Field(
        description="Fraction per minute, e.g. 0.01 = one percentage point/min."
    )
    direction: Literal["rising", "falling", "both"] = Field(
        default="rising", description="Which movement alarms: rising, falling or both."
    )
    deadband: float = Field(
        default=0.002, ge=0, description="Hysteresis on the slope, fraction per minute."
    )
    min_span: Duration = Field(
        default=120.0,
        ge=0,
        description="Time the trend's frames must span before the slope may alarm: a slope "
        "fitted on the first seconds of a batch is noise.",
    )
    min_count: int = Field(
        default=100,
        ge=0,
        description="Confident particles needed in `window`; fewer holds the alarm state.",
    )
    window: WindowSeconds | None = Field(
        default=None,
        description="Window whose particle count is checked against min_count; use the "
        "aggregator's trend window (the middle window by default). None: the longest.",
    )


class ShiftAlarm(_Definition):
    """Bernoulli CUSUM (Reynolds & Stoumbos 1999) for a rise of one class's rate.

    Fed per frame by `AlarmEngine.observe_counts`: a frame's n confident particles, k of
    them of the class, are treated as n Bernoulli trials and added in one step,
    S = clamp(S + k·ln(p1/p0) + (n-k)·ln((1-p1)/(1-p0)), 0, max_sum). The order of
    particles inside a frame is unknown, so S is floored at 0 once per frame rather than
    once per particle; this only matters when S is near 0. The condition holds from
    S >= threshold until S has drifted back to 0 (the CUSUM's own hysteresis): the
    in-control drift per particle is negative, so S returns to 0 in about
    max_sum / |drift| particles once the rate is back at `baseline`.
    """

    kind: Literal["shift"] = Field(
        description="shift: Bernoulli CUSUM on single particles, for a rise of one class's rate."
    )
    class_name: str = Field(min_length=1, description="Class name from the model manifest.")
    baseline: float = Field(gt=0, lt=1, description="In-control rate p0 of the class.")
    shifted: float = Field(gt=0, lt=1, description="Rate p1 > p0 the chart should detect.")
    threshold: float = Field(gt=0, description="Decision interval h: active when S >= h.")
    max_sum: float | None = Field(
        default=None,
        gt=0,
        description="Upper clamp of S so the alarm clears in bounded time after a long "
        "shift; default 2 × threshold. Must be >= threshold.",
    )

    @model_validator(mode="after")
    def _rates_ordered(self) -> ShiftAlarm:
        if self.shifted <= self.baseline:
            raise ValueError(
                f"shifted rate {self.shifted} must be above baseline {self.baseline} "
                "(the chart detects an increase)"
            )
        if self.max_sum is not None and self.max_sum < self.threshold:
            raise ValueError(f"max_sum {self.max_sum} must be >= threshold {self.threshold}")
        return self

    @property
    def increments(self) -> tuple[float, float]:
        """(log-likelihood ratio of a particle of the class, of any other particle)."""
        p0, p1 = self.baseline, self.shifted
        return math.log(p1 / p0), math.log((1.0 - p1) / (1.0 - p0))

    @property
    def ceiling(self) -> float:
        """The clamp on S."""
        return 2.0 * self.threshold if self.max_sum is None else self.max_sum


class ProbeStaleAlarm(_Definition):
    """No frame (accepted or rejected) for longer than `max_age`."""

    kind: Literal["probe_stale"] = Field(
        description="probe_stale: no frame at all (accepted or rejected) for max_age."
    )
    max_age: Duration = Field(gt=0, description="Longest silence before the probe is stale.")


class ImageQualityAlarm(_Definition):
    """Share of frames rejected by the quality gate above `limit`."""

    kind: Literal["image_quality"] = Field(
        description="image_quality: too many frames rejected by the quality gate."
    )
    window: WindowSeconds = Field(description="Aggregation window (one of aggregation.windows).")
    limit: _Fraction = Field(default=0.5, description="Rejected-frame share limit, 0-1.")
    deadband: _Fraction = Field(default=0.05, description="Clears below limit - deadband.")
    min_frames: int = Field(
        default=10, ge=1, description="Frames (accepted + rejected) needed in the window."
    )


class UncertainHighAlarm(_Definition):
    """Share of particles below the model's confidence threshold above `limit`."""

    kind: Literal["uncertain_high"] = Field(
        description="uncertain_high: too many particles below the model's confidence threshold."
    )
    window: WindowSeconds = Field(description="Aggregation window (one of aggregation.windows).")
    limit: _Fraction = Field(description="Uncertain-particle share limit, 0-1.")
    deadband: _Fraction = Field(default=0.05, description="Clears below limit - deadband.")
    min_count: int = Field(
        default=100, ge=1, description="Particles (confident + uncertain) needed in the window."
    )


class OutOfDistributionAlarm(_Definition):
    """Share of particles the model rejects as out of distribution above `limit`.

    The probe sees things the model was never trained on (bubbles, a fouled window,
    another material, a probe out of the slurry): the fractions then describe only
    what is left, so the process alarms are suppressed while this one stands.
    """

    kind: Literal["out_of_distribution"] = Field(
        description="out_of_distribution: too many particles unlike anything the model was "
        "trained on (bubbles, fouling, another material); process alarms are suppressed meanwhile."
    )
    window: WindowSeconds = Field(description="Aggregation window (one of aggregation.windows).")
    limit: _Fraction = Field(description="Out-of-distribution particle share limit, 0-1.")
    deadband: _Fraction = Field(default=0.05, description="Clears below limit - deadband.")
    min_count: int = Field(
        default=100, ge=1, description="Particles (all, rejected ones included) needed."
    )


class PublishOverflowAlarm(_Definition):
    """A publisher dropped messages: its bounded outbox overflowed during a long outage.

    A system alarm: it says nothing about the process or the probe, so it is never
    suppressed by bad input and never makes the input quality bad.
    """

    kind: Literal["publish_overflow"] = Field(
        description="publish_overflow: a publisher's bounded outbox dropped messages during a "
        "long outage; a system alarm, never suppressed."
    )
    publisher: str = Field(default="mqtt", min_length=1, description="Publisher name, e.g. mqtt.")
    hold: Duration = Field(
        default=600.0, gt=0, description="Stays active this long after the last dropped message."
    )


AlarmDefinition = Annotated[
    FractionHighAlarm
    | FractionLowAlarm
    | RateOfChangeAlarm
    | ShiftAlarm
    | ProbeStaleAlarm
    | ImageQualityAlarm
    | UncertainHighAlarm
    | OutOfDistributionAlarm
    | PublishOverflowAlarm,
    Field(discriminator="kind"),
]

WINDOWED_KINDS: frozenset[str] = frozenset(
    kind
    for model in get_args(get_args(AlarmDefinition)[0])
    if "window" in model.model_fields
    for kind in get_args(model.model_fields["kind"].annotation)
)
"""Kinds whose definitions have a `window` (one of the aggregation windows)."""

_DEFINITIONS_ADAPTER: TypeAdapter[tuple[AlarmDefinition, ...]] = TypeAdapter(
    tuple[AlarmDefinition, ...]
)


def is_diagnostic(definition: AlarmDefinition) -> bool:
    """True for alarms about the probe's input rather than the process."""
    return definition.kind in DIAGNOSTIC_KINDS


def parse_definitions(data: Iterable[Mapping[str, Any]]) -> tuple[AlarmDefinition, ...]:
    """Validate raw alarm tables (e.g. `[[alarms]]` from TOML); ids must be unique."""
    definitions = _DEFINITIONS_ADAPTER.validate_python(list(data))
    ensure_unique_ids(definitions)
    return definitions


def ensure_unique_ids(definitions: Sequence[AlarmDefinition]) -> None:
    """Raise on a duplicate alarm id: acknowledgements and the journal key on it."""
    seen: set[str] = set()
    for definition in definitions:
        if definition.id in seen:
            raise ValueError(f"duplicate alarm id {definition.id!r}: give each alarm its own id")
        seen.add(definition.id)


def check_definitions(
    definitions: Sequence[AlarmDefinition],
    windows_s: Sequence[float],
    class_names: Sequence[str],
) -> list[str]:
    """Problems of the definitions against the aggregation windows and model classes.

    Returns one line per problem (empty when all fit), naming the alarm and the fix.
    """
    alarm_windows = [
        (definition.id, window)
        for definition in definitions
        if (window := getattr(definition, "window", None)) is not None
    ]
    return check_windows(alarm_windows, windows_s) + check_classes(definitions, class_names)


def check_windows(
    alarm_windows: Iterable[tuple[str, float]], windows_s: Sequence[float]
) -> list[str]:
    """Problems of (alarm id, window in s) pairs against the aggregation windows.

    Pairs rather than definitions: the configuration checks each alarm's window even
    when another key of that alarm is wrong, so one pass of `validate-config` reports
    both (the classes need the model: `check_classes`).
    """
    problems: list[str] = []
    windows = {float(w) for w in windows_s}
    shown = ", ".join(f"{w:g}s" for w in sorted(windows))
    for alarm_id, window in alarm_windows:
        if float(window) not in windows:
            problems.append(
                f"alarm {alarm_id!r}: window {window:g}s is not an aggregation window "
                f"({shown}); add it to aggregation.windows or pick one of those"
            )
    return problems


def check_classes(definitions: Sequence[AlarmDefinition], class_names: Sequence[str]) -> list[str]:
    """Problems of the definitions' classes against the model manifest's classes."""
    problems: list[str] = []
    for definition in definitions:
        class_name = getattr(definition, "class_name", None)
        if class_name is not None and class_name not in class_names:
            problems.append(
                f"alarm {definition.id!r}: class {class_name!r} is not in the model's "
                f"classes {list(class_names)}"
            )
    return problems


class AlarmsConfig(BaseModel):
    """The `[alarms]` section: definitions plus engine-wide settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_shelve: Duration = Field(
        default=8 * 3600.0, gt=0, description="Longest time an operator may shelve an alarm."
    )
    definitions: tuple[AlarmDefinition, ...] = Field(
        default=(), description="The alarms, each with a unique id."
    )

    @field_validator("definitions")
    @classmethod
    def _unique_ids(cls, value: tuple[AlarmDefinition, ...]) -> tuple[AlarmDefinition, ...]:
        ensure_unique_ids(value)
        return value
