"""Rate limits for log lines of failures that repeat (a full disk, a locked database).

A failure that happens at every retry must not flood the journal: the first one is
logged at once, the rest of each interval only counted, and the next line carries
how many there were. Pure logic with an injected clock, so it is tested without time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable


class RepeatLimiter:
    """One log line per reason per `interval_s`, each with the count since the last."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def due(self, reason: str) -> int:
        """Count one occurrence of `reason`; return how many to report now, 0 to stay quiet."""
        self._unlogged[reason] += 1
        now = self._clock()
        last = self._logged_at.get(reason)
        if last is not None and now - last < self.interval_s:
            return 0
        self._logged_at[reason] = now
        count, self._unlogged[reason] = self._unlogged[reason], 0
        return count

    def reset(self) -> None:
        """Forget every reason (the failure is over: the next one is news again)."""
        self._logged_at.clear()
        self._unlogged.clear()
