"""How numbers and times look on the wire: one rule for every JSON document the plant
reads (MQTT payloads, the HTTP API, exports).

- Times are ISO 8601 UTC with milliseconds (`2024-05-01T12:00:00.123Z`). Inside the
  daemon they are epoch seconds; `to_wire` converts the fields named in `TIME_FIELDS`.
- Numbers keep `SIGNIFICANT_DIGITS` significant digits: a share of 0.1234567 is sent as
  0.123457, a rate of 5332.125178917517 as 5332.13. That is finer than any figure here
  is known to, and a historian stores the same digits the dashboard shows.
- A number that cannot be computed is null, never NaN or infinity (JSON has neither);
  the document says why in a `*_reason` field where a reason is known.
- Window lengths carry their unit: the statistics of the 300 s window sit under "300s"
  and say `"window_s": 300`.

Pure functions over plain values; the JSON Schemas in `monitor/schemas/` describe the
results.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monitor.timestamps import iso_utc

SIGNIFICANT_DIGITS = 6

TIME_FIELDS = frozenset(
    {
        "ts",
        "active_since",
        "state_since",
        "acknowledged_at",
        "shelved_until",
        "last_frame_ts",
        "last_drop_ts",
        "since",
        "now",
        "started",
        "stopped",
        "run_id",
    }
)
"""Keys whose numbers are epoch seconds inside the daemon and ISO strings outside."""

UNITS = {
    "fraction": "fraction of particles, 0 to 1 (0.15 = 15 %)",
    "ci95": "fraction, 0 to 1: the 95 % interval of the fraction",
    "adjusted": "fraction, 0 to 1, corrected for the model's confusions",
    "rejected_share": "fraction of frames, 0 to 1",
    "uncertain_share": "fraction of particles, 0 to 1",
    "ood_share": "fraction of particles, 0 to 1",
    "particles_per_min": "1/min",
    "frames_per_min": "1/min",
    "ewma": "fraction, 0 to 1",
    "slope_per_min": "fraction per minute",
    "span_s": "s",
    "window_s": "s",
}
"""Units of the statistics documents (sent with them as `units`)."""


def rounded(value: float) -> float | None:
    """`value` to SIGNIFICANT_DIGITS digits; None for NaN and infinities."""
    if not math.isfinite(value):
        return None
    if value == 0:
        return 0.0
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _time(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return to_wire(value)
    return iso_utc(value) if math.isfinite(value) else None


def to_wire(document: Any) -> Any:
    """`document` with times as ISO strings, numbers rounded and NaN as null (a copy)."""
    if isinstance(document, float):
        return rounded(document)
    if isinstance(document, Mapping):
        out: dict[str, Any] = {}
        for key, value in document.items():
            if key in TIME_FIELDS:
                out[key] = [_time(v) for v in value] if isinstance(value, list) else _time(value)
            else:
                out[key] = to_wire(value)
        return out
    if isinstance(document, list | tuple):
        return [to_wire(item) for item in document]
    return document


def window_key(seconds: int | str) -> str:
    """The key of a window's statistics on the wire: 300 -> "300s"."""
    return f"{int(float(seconds))}s"


def windows_on_wire(windows: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot's {"300": stats} as {"300s": {"window_s": 300, **stats}}."""
    return {
        window_key(seconds): {"window_s": int(float(seconds)), **stats}
        for seconds, stats in windows.items()
    }


def snapshot_on_wire(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """`ProbeSnapshot.to_json()` as documents carry it: windows keyed with their unit,
    times ISO, numbers rounded, and the units said."""
    document = {key: value for key, value in snapshot.items() if key != "windows"}
    document["windows"] = windows_on_wire(snapshot.get("windows", {}))
    document["units"] = UNITS
    return dict(to_wire(document))
