"""The SQLite store: processed-files journal, one row per frame, window snapshots.

WAL mode lets `crystal-monitor export` read while the daemon writes. A frame's row
and its journal entry are written in the same transaction, so after a crash a file
is either fully recorded or not at all: a restart neither loses nor double-counts it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB_FILE = "crystal-monitor.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    probe TEXT NOT NULL,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (probe, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY,
    probe TEXT NOT NULL,
    key TEXT NOT NULL,
    ts REAL NOT NULL,
    batch TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    counts TEXT NOT NULL,
    n_uncertain INTEGER NOT NULL,
    stored_at REAL NOT NULL,
    latency_s REAL,
    n_ood INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS frames_probe_ts ON frames (probe, ts);
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY,
    probe TEXT NOT NULL,
    ts REAL NOT NULL,
    batch TEXT,
    snapshot TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS windows_probe_ts ON windows (probe, ts);
CREATE TABLE IF NOT EXISTS alarm_journal (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    probe TEXT NOT NULL,
    alarm_id TEXT NOT NULL,
    event TEXT NOT NULL,
    entry TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alarm_journal_ts ON alarm_journal (ts);
CREATE TABLE IF NOT EXISTS state (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    probe TEXT NOT NULL,
    batch TEXT NOT NULL,
    started REAL NOT NULL,
    stopped REAL,
    PRIMARY KEY (probe, batch, started)
);
"""


@dataclass(frozen=True)
class FrameRow:
    """The summary of one frame (or one crop file) as stored."""

    probe: str
    key: str
    ts: float
    batch: str | None
    status: str  # "ok", "rejected" or "error"
    reason: str | None
    counts: dict[str, int]
    n_uncertain: int
    stored_at: float
    latency_s: float | None = None
    n_ood: int = 0  # particles rejected as out of distribution
    journal: bool = True  # files are journaled; stream frames have no file to remember


class Store:
    """One connection guarded by a lock: writes are short, readers use their own handle."""

    def __init__(self, state_dir: Path, *, readonly: bool = False) -> None:
        self.path = state_dir / DB_FILE
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no store at {self.path} (has the daemon run yet?)")
            uri = f"file:{self.path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            _add_missing_columns(self._db)
        self._db.execute("PRAGMA busy_timeout=5000")
        # A read-only view of a store from an older version has no n_ood column yet.
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(frames)")}
        self._n_ood_column = "n_ood" if "n_ood" in columns else "0"
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- journal -------------------------------------------------------------------

    def journaled_keys(self, probe: str) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT key FROM files WHERE probe = ?", (probe,))
            return {key for (key,) in rows}

    def record_skipped(self, probe: str, keys: Iterable[str], reason: str, now: float) -> None:
        """Journal files that will deliberately never be processed (backlog policy)."""
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO files VALUES (?, ?, 'skipped', ?, ?)",
                [(probe, key, reason, now) for key in keys],
            )

    def record_frames(self, rows: Sequence[FrameRow]) -> dict[tuple[str, str], bool]:
        """Store frames and journal their files in one transaction.

        Returns, per (probe, key), whether the row was added. A frame whose file is
        already journaled is ignored: that is the exactly-once guarantee when a file
        is seen twice (event plus rescan, or after a restart).
        """
        added: dict[tuple[str, str], bool] = {}
        with self._lock, self._transaction():
            for row in rows:
                if row.journal:
                    cursor = self._db.execute(
                        "INSERT OR IGNORE INTO files VALUES (?, ?, ?, ?, ?)",
                        (row.probe, row.key, row.status, row.reason, row.stored_at),
                    )
                    if cursor.rowcount == 0:
                        added[(row.probe, row.key)] = False
                        continue
                self._db.execute(
                    "INSERT INTO frames (probe, key, ts, batch, status, reason, counts,"
                    " n_uncertain, stored_at, latency_s, n_ood)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row.probe,
                        row.key,
                        row.ts,
                        row.batch,
                        row.status,
                        row.reason,
                        json.dumps(row.counts),
                        row.n_uncertain,
                        row.stored_at,
                        row.latency_s,
                        row.n_ood,
                    ),
                )
                added[(row.probe, row.key)] = True
        return added

    # -- windows and batches ----------------------------------------------------------

    def record_snapshot(
        self, probe: str, ts: float, batch: str | None, snapshot: dict[str, Any]
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO windows (probe, ts, batch, snapshot) VALUES (?, ?, ?, ?)",
                (probe, ts, batch, json.dumps(snapshot)),
            )

    def record_alarm_journal(self, entries: Sequence[dict[str, Any]]) -> None:
        """Every alarm transition and operator action (who, when, comment), kept for audit."""
        if not entries:
            return
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT INTO alarm_journal (ts, probe, alarm_id, event, entry)"
                " VALUES (?, ?, ?, ?, ?)",
                [(e["ts"], e["probe"], e["alarm_id"], e["event"], json.dumps(e)) for e in entries],
            )

    def iter_alarm_journal(self, since: float = 0.0) -> Iterator[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT entry FROM alarm_journal WHERE ts >= ? ORDER BY id", (since,)
            ).fetchall()
        return (json.loads(entry) for (entry,) in rows)

    def save_state(self, name: str, value: dict[str, Any]) -> None:
        """Persist a component's state (the alarm engine's) so a restart resumes it."""
        with self._lock:
            self._db.execute(
                "INSERT INTO state VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (name, json.dumps(value)),
            )

    def load_state(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def start_batch(self, probe: str, batch: str, ts: float) -> None:
        with self._lock, self._transaction():
            self._db.execute(
                "UPDATE batches SET stopped = ? WHERE probe = ? AND stopped IS NULL", (ts, probe)
            )
            self._db.execute("INSERT INTO batches VALUES (?, ?, ?, NULL)", (probe, batch, ts))

    def stop_batch(self, probe: str, ts: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE batches SET stopped = ? WHERE probe = ? AND stopped IS NULL", (ts, probe)
            )

    def current_batch(self, probe: str) -> tuple[str, float] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT batch, started FROM batches WHERE probe = ? AND stopped IS NULL"
                " ORDER BY started DESC LIMIT 1",
                (probe,),
            ).fetchone()
        return (str(row[0]), float(row[1])) if row else None

    def frames_since(self, probe: str, since: float) -> list[FrameRow]:
        """Frames newer than `since`, oldest first: used to refill windows after a restart."""
        with self._lock:
            rows = self._db.execute(
                "SELECT probe, key, ts, batch, status, reason, counts, n_uncertain, stored_at,"
                f" latency_s, {self._n_ood_column} FROM frames"
                " WHERE probe = ? AND ts > ? ORDER BY ts",
                (probe, since),
            ).fetchall()
        return [_frame_row(row) for row in rows]

    def purge(self, older_than: float) -> int:
        """Drop frame rows and snapshots older than the retention; the journal stays.

        The journal is kept because the files it names usually stay in the folder and
        would otherwise be counted again by the next rescan.
        """
        with self._lock, self._transaction():
            frames = self._db.execute("DELETE FROM frames WHERE ts < ?", (older_than,)).rowcount
            windows = self._db.execute("DELETE FROM windows WHERE ts < ?", (older_than,)).rowcount
        return frames + windows

    # -- reading back -------------------------------------------------------------

    def iter_frames(self, since: float = 0.0) -> Iterator[FrameRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT probe, key, ts, batch, status, reason, counts, n_uncertain, stored_at,"
                f" latency_s, {self._n_ood_column} FROM frames WHERE ts >= ? ORDER BY id",
                (since,),
            ).fetchall()
        return (_frame_row(row) for row in rows)

    def iter_snapshots(
        self, since: float = 0.0
    ) -> Iterator[tuple[str, float, str | None, dict[str, Any]]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT probe, ts, batch, snapshot FROM windows WHERE ts >= ? ORDER BY id",
                (since,),
            ).fetchall()
        return ((probe, ts, batch, json.loads(snapshot)) for probe, ts, batch, snapshot in rows)

    def probe_snapshots(
        self, probe: str, since: float, max_rows: int | None = None
    ) -> list[tuple[float, str | None, dict[str, Any]]]:
        """One probe's window snapshots from `since` on, oldest first (the dashboard trend).

        With `max_rows`, a long span is thinned evenly (always keeping the newest) before
        any snapshot is read: the ids come from the (probe, ts) index alone, so a day of
        snapshots costs a few hundred JSON documents, not thousands.
        """
        with self._lock:
            if max_rows is None:
                rows = self._db.execute(
                    "SELECT ts, batch, snapshot FROM windows WHERE probe = ? AND ts >= ?"
                    " ORDER BY ts",
                    (probe, since),
                ).fetchall()
            else:
                ids = [
                    row_id
                    for (row_id,) in self._db.execute(
                        "SELECT id FROM windows WHERE probe = ? AND ts >= ? ORDER BY ts",
                        (probe, since),
                    )
                ]
                if len(ids) > max_rows > 1:
                    step = (len(ids) - 1) / (max_rows - 1)
                    ids = [ids[round(i * step)] for i in range(max_rows)]
                marks = ",".join("?" * len(ids))
                rows = self._db.execute(
                    f"SELECT ts, batch, snapshot FROM windows WHERE id IN ({marks}) ORDER BY ts",
                    ids,
                ).fetchall()
        return [(ts, batch, json.loads(snapshot)) for ts, batch, snapshot in rows]

    def recent_alarm_journal(self, limit: int, probe: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` journal entries (of one probe, or all), newest first."""
        with self._lock:
            if probe is None:
                rows = self._db.execute(
                    "SELECT entry FROM alarm_journal ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT entry FROM alarm_journal WHERE probe = ? ORDER BY id DESC LIMIT ?",
                    (probe, limit),
                ).fetchall()
        return [json.loads(entry) for (entry,) in rows]

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error (the connection is in autocommit)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _frame_row(row: tuple[Any, ...]) -> FrameRow:
    probe, key, ts, batch, status, reason, counts, n_uncertain, stored_at, latency_s, n_ood = row
    return FrameRow(
        probe=probe,
        key=key,
        ts=ts,
        batch=batch,
        status=status,
        reason=reason,
        counts=json.loads(counts),
        n_uncertain=n_uncertain,
        stored_at=stored_at,
        latency_s=latency_s,
        n_ood=n_ood,
    )


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a store written by an older version up to the current schema, in place.

    Only columns with defaults are ever added, so old rows read as they always did.
    """
    columns = {row[1] for row in db.execute("PRAGMA table_info(frames)")}
    if "n_ood" not in columns:
        db.execute("ALTER TABLE frames ADD COLUMN n_ood INTEGER NOT NULL DEFAULT 0")
