"""Times as the plant reads them: one ISO 8601 UTC form for every message, export,
report and ground-truth file."""

from __future__ import annotations

import math
from datetime import UTC, datetime


def iso_utc(ts: float | datetime) -> str:
    """Epoch seconds (or a datetime; naive is taken as UTC) -> '2024-05-01T12:00:00.123Z'.

    Milliseconds are truncated, never rounded, so a stamp never shows a later time than
    the event had.
    """
    if isinstance(ts, datetime):
        moment = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    else:
        moment = datetime.fromtimestamp(ts, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str, name: str = "time") -> float:
    """A time as an operator or the API writes it -> epoch seconds: ISO 8601 (without a
    zone taken as UTC, 'Z' accepted) or epoch seconds. The ValueError names `name` (the
    parameter or option) and both forms."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"{name} must be a finite time")
        return seconds
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{name} must be an ISO 8601 time (e.g. 2026-12-03T14:00:00Z) or epoch seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
