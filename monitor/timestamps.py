"""Times as the plant reads them: one ISO 8601 UTC form for every message, export,
report and ground-truth file."""

from __future__ import annotations

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
