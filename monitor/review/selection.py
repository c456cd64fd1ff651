"""Which classified crops the review queue keeps, and why. Pure: no clock (the frame's
time decides the hour), no randomness of its own (the caller passes the draw).

A crop is kept for the first reason that applies, in this order:

- "out_of_distribution": the model's OOD score rejected it (a bubble, a fouled window,
  a crystal habit it never saw): the crops most worth an operator's look;
- "uncertain": below the confidence threshold;
- "boundary": certain, but the top two class probabilities lie within `boundary_margin`
  (where a few labels move the decision boundary most);
- "random": a `random_share` of the rest, stratified by the class the model called, so
  the labelled set also measures the easy, common case and is not all hard crops.

Each reason has a cap per clock hour (the random cap split evenly over the classes), so
one bad hour cannot fill the store; what the caps turned away is counted, not hidden.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from monitor.config.review import ReviewConfig
from monitor.inference.decision import Decision

KEPT_REASONS = ("uncertain", "out_of_distribution", "boundary", "random")
HOUR_S = 3600.0


def reason_to_keep(
    decision: Decision,
    probabilities: Sequence[float],
    config: ReviewConfig,
    draw: float,
) -> str | None:
    """Why this crop is worth keeping, or None; `draw` is uniform in [0, 1)."""
    if decision.status != "ok":
        return "out_of_distribution" if decision.reason == "out_of_distribution" else "uncertain"
    ranked = sorted(probabilities, reverse=True)
    if len(ranked) >= 2 and ranked[0] - ranked[1] < config.boundary_margin:
        return "boundary"
    if draw < config.random_share:
        return "random"
    return None


@dataclass
class HourTally:
    """One hour's selection for one reason: kept, turned away by the cap, dropped
    because the writer had fallen behind (counted by the queue)."""

    kept: int = 0
    over_cap: int = 0
    dropped: int = 0


@dataclass
class HourlyCaps:
    """Per (hour, reason, stratum) counts against the caps; only the current hours are
    held (older ones are handed out by `take_tallies` and forgotten)."""

    config: ReviewConfig
    classes: tuple[str, ...]
    _counts: dict[tuple[float, str, str], int] = field(default_factory=dict)
    _tallies: dict[tuple[float, str], HourTally] = field(default_factory=dict)
    _latest_hour: float = -math.inf

    def cap(self, reason: str) -> int:
        caps = self.config.per_hour
        if reason == "random":
            # Each class its even part, rounded up so a small cap still keeps some of each.
            return math.ceil(caps.random / max(1, len(self.classes)))
        return int(getattr(caps, reason))

    def admit(self, reason: str, stratum: str, ts: float) -> bool:
        """Count a crop kept for `reason` at frame time `ts`; False once the hour's cap
        for it is reached (the random reason is capped per `stratum`, the called class)."""
        hour = math.floor(ts / HOUR_S) * HOUR_S
        self._latest_hour = max(self._latest_hour, hour)
        key = (hour, reason, stratum if reason == "random" else "")
        tally = self._tallies.setdefault((hour, reason), HourTally())
        used = self._counts.get(key, 0)
        if used >= self.cap(reason):
            tally.over_cap += 1
            return False
        self._counts[key] = used + 1
        tally.kept += 1
        return True

    def dropped(self, reason: str, ts: float) -> None:
        """A crop admitted but not written (the writer's queue was full)."""
        hour = math.floor(ts / HOUR_S) * HOUR_S
        tally = self._tallies.setdefault((hour, reason), HourTally())
        tally.kept -= 1
        tally.dropped += 1

    def take_tallies(self) -> dict[tuple[float, str], HourTally]:
        """The tallies so far (to add to the store's record), reset; hours more than one
        before the newest frame's are forgotten from the caps too (frame time, not the
        clock: a backlog of old files is capped by the hours it was taken in)."""
        taken, self._tallies = self._tallies, {}
        oldest = self._latest_hour - HOUR_S
        self._counts = {key: n for key, n in self._counts.items() if key[0] >= oldest}
        return taken
