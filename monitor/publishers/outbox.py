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

The outbox's tables live in the store's SQLite file (`crystal-monitor.sqlite`), reached
through a connection of their own, behind a lock, as in `monitor.store`. Sharing the file
is what makes a frame and its result message one durable record: the recorder stages
results into the transaction that stores the frames (`append(..., tx=...)`), so a crash
or a locked database leaves both or neither, and a seq is never handed to a message that
was not kept. A committed row survives a killed process. An outbox from an older version
(its own `outbox.sqlite`) is imported once and renamed `outbox.sqlite.imported`.
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

import structlog

from monitor.store import DB_FILE, StoreTransaction

log = structlog.get_logger(__name__)

LEGACY_OUTBOX_FILE = "outbox.sqlite"  # before the outbox moved into the store's file

Stream = Literal["events", "results"]
STREAMS: tuple[Stream, ...] = ("events", "results")
# Lower drops first when the outbox is full: results are bulk, events must not be lost.
_DROP_PRIORITY: dict[Stream, int] = {"results": 0, "events": 1}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    probe TEXT NOT NULL,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    drop_priority INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_messages_drop ON outbox_messages (drop_priority, id);
CREATE TABLE IF NOT EXISTS outbox_sequences (
    probe TEXT NOT NULL,
    stream TEXT NOT NULL,
    last INTEGER NOT NULL,
    PRIMARY KEY (probe, stream)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox_retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    updated REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox_counters (
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
        self.path = state_dir / DB_FILE
        self.max_events = max_events
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        _import_legacy_outbox(self._db, state_dir / LEGACY_OUTBOX_FILE)
        self._lock = threading.Lock()
        (self._count,) = self._db.execute("SELECT COUNT(*) FROM outbox_messages").fetchone()
        self._dropped: dict[str, int] = dict.fromkeys(STREAMS, 0)
        for name, value in self._db.execute("SELECT name, value FROM outbox_counters"):
            if name.startswith("dropped_") and name[len("dropped_") :] in self._dropped:
                self._dropped[name[len("dropped_") :]] = int(value)
        self._retained: dict[str, bytes] = dict(
            self._db.execute("SELECT topic, payload FROM outbox_retained ORDER BY topic")
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- streams -------------------------------------------------------------------

    def append(
        self,
        probe: str,
        stream: Stream,
        topic: str,
        body: dict[str, Any],
        *,
        tx: StoreTransaction | None = None,
    ) -> int:
        """Store one stream message with the next `seq` of (probe, stream); return that seq.

        The payload is `body` with "probe" and "seq" added. If the outbox is now over
        its bound, the oldest rows are dropped (results first) and counted. With `tx`
        the message joins that open store transaction (it is kept only if that
        commits); without, it is committed on its own.
        """
        if tx is not None:
            key = f"outbox:{id(self)}"
            staged: list[Any] = tx.scratch.get(key) or [0, {}]
            if key not in tx.scratch:
                tx.scratch[key] = staged
                tx.after_commit(lambda: self._committed(staged[0], staged[1]))
            # Not under self._lock: whoever holds it may be waiting for the SQLite write
            # lock this transaction holds. A stale count only moves the bound by a few rows.
            seq, dropped = self._insert(
                tx.connection, probe, stream, topic, body, backlog=self._count + staged[0]
            )
            staged[0] += 1 - sum(dropped.values())
            for name, n in dropped.items():
                staged[1][name] = staged[1].get(name, 0) + n
            return seq
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq, dropped = self._insert(
                    self._db, probe, stream, topic, body, backlog=self._count
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._count += 1 - sum(dropped.values())
            for name, n in dropped.items():
                self._dropped[name] += n
            return seq

    def _committed(self, added: int, dropped: dict[str, int]) -> None:
        with self._lock:
            self._count += added
            for name, n in dropped.items():
                self._dropped[name] += n

    def _insert(
        self,
        db: sqlite3.Connection,
        probe: str,
        stream: Stream,
        topic: str,
        body: dict[str, Any],
        *,
        backlog: int,
    ) -> tuple[int, dict[str, int]]:
        """The SQL of one append inside an open transaction: (seq, rows dropped per stream)."""
        row = db.execute(
            "SELECT last FROM outbox_sequences WHERE probe = ? AND stream = ?", (probe, stream)
        ).fetchone()
        seq = 1 if row is None else int(row[0]) + 1
        db.execute(
            "INSERT INTO outbox_sequences VALUES (?, ?, ?) "
            "ON CONFLICT (probe, stream) DO UPDATE SET last = excluded.last",
            (probe, stream, seq),
        )
        payload = encode_json({**body, "probe": probe, "seq": seq})
        db.execute(
            "INSERT INTO outbox_messages (probe, stream, seq, topic, payload, drop_priority,"
            " created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (probe, stream, seq, topic, payload, _DROP_PRIORITY[stream], time.time()),
        )
        dropped: dict[str, int] = {}
        if backlog + 1 > self.max_events:
            dropped = self._drop_oldest(db, backlog + 1 - self.max_events)
        return seq, dropped

    @staticmethod
    def _drop_oldest(db: sqlite3.Connection, excess: int) -> dict[str, int]:
        rows = db.execute(
            "SELECT id, stream FROM outbox_messages ORDER BY drop_priority, id LIMIT ?", (excess,)
        ).fetchall()
        dropped: dict[str, int] = {}
        for _, stream in rows:
            dropped[stream] = dropped.get(stream, 0) + 1
        db.executemany(
            "DELETE FROM outbox_messages WHERE id = ?", [(row_id,) for row_id, _ in rows]
        )
        for stream, n in dropped.items():
            db.execute(
                "INSERT INTO outbox_counters VALUES (?, ?) "
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
                "SELECT id, probe, stream, seq, topic, payload FROM outbox_messages WHERE id > ? "
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
                        "DELETE FROM outbox_messages WHERE id = ?", (row_id,)
                    ).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._count -= removed
            return removed

    def last_seq(self, probe: str, stream: Stream) -> int:
        """The last seq handed out for (probe, stream); 0 before the first."""
        with self._lock:
            row = self._db.execute(
                "SELECT last FROM outbox_sequences WHERE probe = ? AND stream = ?", (probe, stream)
            ).fetchone()
        return 0 if row is None else int(row[0])

    # -- retained state ------------------------------------------------------------

    def put_retained(self, topic: str, payload: bytes) -> bool:
        """Make `payload` the latest value of a retained topic; False if it was already."""
        with self._lock:
            if self._retained.get(topic) == payload:
                return False
            self._db.execute(
                "INSERT INTO outbox_retained VALUES (?, ?, ?) ON CONFLICT (topic) DO UPDATE "
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


def _import_legacy_outbox(db: sqlite3.Connection, legacy: Path) -> None:
    """Move an older version's outbox (its own file) into the store's file, once.

    Undelivered messages keep their order behind any already here, sequences continue
    from the larger last seq, counters add up; the old file is then renamed, never
    deleted, so an interrupted import is simply redone at the next start.
    """
    if not legacy.is_file():
        return
    db.execute("ATTACH DATABASE ? AS legacy", (str(legacy),))
    try:
        tables = {
            name
            for (name,) in db.execute("SELECT name FROM legacy.sqlite_master WHERE type='table'")
        }
        db.execute("BEGIN IMMEDIATE")
        try:
            moved = 0
            if "messages" in tables:
                moved = db.execute(
                    "INSERT INTO outbox_messages (probe, stream, seq, topic, payload,"
                    " drop_priority, created) SELECT probe, stream, seq, topic, payload,"
                    " drop_priority, created FROM legacy.messages ORDER BY id"
                ).rowcount
            if "sequences" in tables:
                db.execute(
                    "INSERT INTO outbox_sequences SELECT probe, stream, last FROM legacy.sequences"
                    " WHERE true ON CONFLICT (probe, stream) DO UPDATE"
                    " SET last = max(last, excluded.last)"
                )
            if "retained" in tables:
                db.execute(
                    "INSERT OR IGNORE INTO outbox_retained SELECT topic, payload, updated"
                    " FROM legacy.retained"
                )
            if "counters" in tables:
                db.execute(
                    "INSERT INTO outbox_counters SELECT name, value FROM legacy.counters"
                    " WHERE true ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    finally:
        db.execute("DETACH DATABASE legacy")
    # The -wal of a cleanly closed old outbox is already checkpointed; rename all three.
    for suffix in ("", "-wal", "-shm"):
        part = legacy.with_name(legacy.name + suffix)
        if part.exists():
            part.rename(part.with_name(part.name.replace(".sqlite", ".sqlite.imported", 1)))
    log.info("outbox_imported", source=str(legacy), messages=moved)
