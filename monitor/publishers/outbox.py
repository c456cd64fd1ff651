"""The MQTT publisher's persistent outbox: what the broker has not acknowledged yet.

Two kinds of message, two policies:

- **Streams** (events and per-frame results) must arrive complete and in order. Each
  message gets its per-probe, per-stream `seq` in the same transaction that stores it,
  so numbers survive a restart and are never reused. A row leaves the outbox only when
  the broker acknowledges it (QoS 1 PUBACK). The outbox is bounded: beyond
  `max_events` rows the oldest are dropped, results before events, and counted (the
  counters persist too); a consumer sees the drop as a gap in `seq`.
- **Retained state** (fractions, alarm states) only matters as its latest value: one
  row per topic, replaced on every update. These rows are kept after delivery too; the
  publisher re-publishes all of them on every connect, which also restores a broker
  that lost its retained store.

SQLite in WAL mode in its own file (`outbox.sqlite`), one connection behind a lock, the
same pattern as `monitor.store`. A committed row survives a killed process.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

OUTBOX_FILE = "outbox.sqlite"

Stream = Literal["events", "results"]
STREAMS: tuple[Stream, ...] = ("events", "results")
# Lower drops first when the outbox is full: results are bulk, events must not be lost.
_DROP_PRIORITY: dict[Stream, int] = {"results": 0, "events": 1}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    probe TEXT NOT NULL,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    drop_priority INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_drop ON messages (drop_priority, id);
CREATE TABLE IF NOT EXISTS sequences (
    probe TEXT NOT NULL,
    stream TEXT NOT NULL,
    last INTEGER NOT NULL,
    PRIMARY KEY (probe, stream)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    updated REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""


def _finite(value: Any) -> Any:
    """Replace NaN and infinities (not JSON) by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def encode_json(document: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; non-finite floats become null, unknown types their str()."""
    try:
        text = json.dumps(document, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        text = json.dumps(_finite(document), separators=(",", ":"), allow_nan=False, default=str)
    return text.encode("utf-8")


@dataclass(frozen=True)
class OutboxMessage:
    """One stream message waiting for the broker's acknowledgement."""

    id: int
    """Position in the outbox: delivery order."""
    probe: str
    stream: Stream
    seq: int
    topic: str
    payload: bytes


@dataclass(frozen=True)
class OutboxStats:
    backlog: int
    """Stream messages not yet acknowledged."""
    dropped: dict[str, int]
    """Stream messages dropped because the outbox was full, per stream, since it was created."""
    retained_topics: int


class Outbox:
    """Bounded, persistent store of unacknowledged stream messages and latest retained state."""

    def __init__(self, state_dir: Path, *, max_events: int) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / OUTBOX_FILE
        self.max_events = max_events
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        (self._count,) = self._db.execute("SELECT COUNT(*) FROM messages").fetchone()
        self._dropped: dict[str, int] = dict.fromkeys(STREAMS, 0)
        for name, value in self._db.execute("SELECT name, value FROM counters"):
            if name.startswith("dropped_") and name[len("dropped_") :] in self._dropped:
                self._dropped[name[len("dropped_") :]] = int(value)
        self._retained: dict[str, bytes] = dict(
            self._db.execute("SELECT topic, payload FROM retained ORDER BY topic")
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- streams -------------------------------------------------------------------

    def append(self, probe: str, stream: Stream, topic: str, body: dict[str, Any]) -> int:
        """Store one stream message with the next `seq` of (probe, stream); return that seq.

        The payload is `body` with "probe" and "seq" added. If the outbox is now over
        its bound, the oldest rows are dropped (results first) and counted.
        """
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT last FROM sequences WHERE probe = ? AND stream = ?", (probe, stream)
                ).fetchone()
                seq = 1 if row is None else int(row[0]) + 1
                self._db.execute(
                    "INSERT INTO sequences VALUES (?, ?, ?) "
                    "ON CONFLICT (probe, stream) DO UPDATE SET last = excluded.last",
                    (probe, stream, seq),
                )
                payload = encode_json({**body, "probe": probe, "seq": seq})
                self._db.execute(
                    "INSERT INTO messages (probe, stream, seq, topic, payload, drop_priority,"
                    " created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (probe, stream, seq, topic, payload, _DROP_PRIORITY[stream], now),
                )
                count = self._count + 1
                dropped: dict[str, int] = {}
                if count > self.max_events:
                    dropped = self._drop_oldest(count - self.max_events)
                    count -= sum(dropped.values())
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count = count
            for name, n in dropped.items():
                self._dropped[name] += n
            return seq

    def _drop_oldest(self, excess: int) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT id, stream FROM messages ORDER BY drop_priority, id LIMIT ?", (excess,)
        ).fetchall()
        dropped: dict[str, int] = {}
        for _, stream in rows:
            dropped[stream] = dropped.get(stream, 0) + 1
        self._db.executemany("DELETE FROM messages WHERE id = ?", [(row_id,) for row_id, _ in rows])
        for stream, n in dropped.items():
            self._db.execute(
                "INSERT INTO counters VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (f"dropped_{stream}", n),
            )
        return dropped

    def pending(self, after_id: int, limit: int) -> list[OutboxMessage]:
        """Up to `limit` unacknowledged stream messages after `after_id`, oldest first."""
        if limit <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT id, probe, stream, seq, topic, payload FROM messages WHERE id > ? "
                "ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [OutboxMessage(*row) for row in rows]

    def acknowledge(self, ids: list[int]) -> int:
        """Remove delivered messages; ids already dropped are ignored. Returns rows removed."""
        if not ids:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                for row_id in ids:
                    removed += self._db.execute(
                        "DELETE FROM messages WHERE id = ?", (row_id,)
                    ).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count -= removed
            return removed

    def last_seq(self, probe: str, stream: Stream) -> int:
        """The last seq handed out for (probe, stream); 0 before the first."""
        with self._lock:
            row = self._db.execute(
                "SELECT last FROM sequences WHERE probe = ? AND stream = ?", (probe, stream)
            ).fetchone()
        return 0 if row is None else int(row[0])

    # -- retained state ------------------------------------------------------------

    def put_retained(self, topic: str, payload: bytes) -> bool:
        """Make `payload` the latest value of a retained topic; False if it was already."""
        with self._lock:
            if self._retained.get(topic) == payload:
                return False
            self._db.execute(
                "INSERT INTO retained VALUES (?, ?, ?) ON CONFLICT (topic) DO UPDATE "
                "SET payload = excluded.payload, updated = excluded.updated",
                (topic, payload, time.time()),
            )
            self._retained[topic] = payload
            return True

    def retained(self) -> dict[str, bytes]:
        """Latest value of every retained topic (a copy)."""
        with self._lock:
            return dict(self._retained)

    def retained_value(self, topic: str) -> bytes | None:
        with self._lock:
            return self._retained.get(topic)

    # -- diagnostics ---------------------------------------------------------------

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(
                backlog=self._count,
                dropped=dict(self._dropped),
                retained_topics=len(self._retained),
            )
