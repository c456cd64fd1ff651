"""How the PG share of the particles changes over simulated time.

A profile maps seconds since the start of a run to the expected fraction of PG
among particles. The plant cares about onsets (a step) and slow growth (a ramp),
so those are the shapes offered; `parse_profile` reads the command-line form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

PROFILE_FORMS = (
    "constant:FRACTION (e.g. constant:0.1), "
    "step:BEFORE:AFTER@SECONDS (e.g. step:0.0:0.2@600), "
    "ramp:FROM:TO@START-END (e.g. ramp:0:0.3@0-1800)"
)


class PgProfile(Protocol):
    """Anything that gives the expected PG fraction at a time."""

    def fraction_at(self, t_seconds: float) -> float:
        """Expected PG share (0..1) at t_seconds after the start."""
        ...


def _check_fraction(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a fraction between 0 and 1, got {value}")


def _check_time(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value}")


@dataclass(frozen=True)
class ConstantProfile:
    """The same PG share all the time."""

    fraction: float

    def __post_init__(self) -> None:
        _check_fraction("fraction", self.fraction)

    def fraction_at(self, t_seconds: float) -> float:
        """The constant share, whatever the time."""
        return self.fraction

    def __str__(self) -> str:
        return f"constant:{self.fraction:g}"


@dataclass(frozen=True)
class StepProfile:
    """PG share jumps from `before` to `after` at `at_s` seconds (an onset)."""

    before: float
    after: float
    at_s: float

    def __post_init__(self) -> None:
        _check_fraction("before", self.before)
        _check_fraction("after", self.after)
        _check_time("at_s", self.at_s)

    def fraction_at(self, t_seconds: float) -> float:
        """`before` until at_s, `after` from at_s on."""
        return self.after if t_seconds >= self.at_s else self.before

    def __str__(self) -> str:
        return f"step:{self.before:g}:{self.after:g}@{self.at_s:g}"


@dataclass(frozen=True)
class RampProfile:
    """PG share moves linearly from start_fraction to end_fraction between start_s and end_s.

    Flat before start_s and after end_s, so a run can show a quiet baseline, the
    growth, and a plateau.
    """

    start_fraction: float
    end_fraction: float
    start_s: float
    end_s: float

    def __post_init__(self) -> None:
        _check_fraction("start_fraction", self.start_fraction)
        _check_fraction("end_fraction", self.end_fraction)
        _check_time("start_s", self.start_s)
        _check_time("end_s", self.end_s)
        if self.end_s <= self.start_s:
            raise ValueError(
                f"ramp end ({self.end_s:g} s) must be after its start ({self.start_s:g} s)"
            )

    def fraction_at(self, t_seconds: float) -> float:
        """Linear interpolation, clamped to the end values outside [start_s, end_s]."""
        if t_seconds <= self.start_s:
            return self.start_fraction
        if t_seconds >= self.end_s:
            return self.end_fraction
        progress = (t_seconds - self.start_s) / (self.end_s - self.start_s)
        return self.start_fraction + progress * (self.end_fraction - self.start_fraction)

    def __str__(self) -> str:
        return f"ramp:{self.start_fraction:g}:{self.end_fraction:g}@{self.start_s:g}-{self.end_s:g}"


def _parse_number(text: str, what: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"bad {what} {text!r} in profile {spec!r}; accepted forms: {PROFILE_FORMS}"
        ) from None


def parse_profile(text: str) -> ConstantProfile | StepProfile | RampProfile:
    """Read a profile from its command-line form.

    Accepted: "constant:0.1", "step:0.0:0.2@600" (before:after@seconds) and
    "ramp:0:0.3@0-1800" (from:to@start-end seconds). Anything else raises
    ValueError naming the accepted forms.
    """
    spec = text.strip()
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    try:
        if kind == "constant" and rest and "@" not in rest and ":" not in rest:
            return ConstantProfile(_parse_number(rest, "fraction", spec))
        if kind == "step":
            fractions, at_sign, when = rest.partition("@")
            before, colon, after = fractions.partition(":")
            if at_sign and colon and when:
                return StepProfile(
                    before=_parse_number(before, "fraction", spec),
                    after=_parse_number(after, "fraction", spec),
                    at_s=_parse_number(when, "time", spec),
                )
        if kind == "ramp":
            fractions, at_sign, window = rest.partition("@")
            start_fraction, colon, end_fraction = fractions.partition(":")
            # Split on the first '-' after the first character so a negative start
            # time still reads as a number rather than as an empty field.
            dash = window.find("-", 1)
            if at_sign and colon and dash > 0:
                return RampProfile(
                    start_fraction=_parse_number(start_fraction, "fraction", spec),
                    end_fraction=_parse_number(end_fraction, "fraction", spec),
                    start_s=_parse_number(window[:dash], "time", spec),
                    end_s=_parse_number(window[dash + 1 :], "time", spec),
                )
    except ValueError as error:
        if "accepted forms" in str(error):
            raise
        raise ValueError(f"{error} in profile {spec!r}; accepted forms: {PROFILE_FORMS}") from None
    raise ValueError(f"cannot read profile {text!r}; accepted forms: {PROFILE_FORMS}")
