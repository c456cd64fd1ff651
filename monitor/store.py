"""The SQLite store: processed-files journal, one row per frame and per particle, window
snapshots.

WAL mode lets `crystal-monitor export` read while the daemon writes. A frame's row,
its journal entry and its outgoing result messages (the MQTT outbox lives in the same
file, see `monitor.publishers.outbox`) are written in one transaction, so after a
crash a file is either fully recorded and announced or not at all: a restart neither
loses nor double-counts it, and no consumer misses a result behind a contiguous seq.

Retention works on the time a row was recorded (`stored_at`), never on the frame time
written into a file name, which a probe's clock or a renamed file can put anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

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
CREATE INDEX IF NOT EXISTS files_recorded_at ON files (recorded_at);
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
    n_ood INTEGER NOT NULL DEFAULT 0,
    model TEXT
);
CREATE INDEX IF NOT EXISTS frames_probe_ts ON frames (probe, ts);
CREATE INDEX IF NOT EXISTS frames_stored_at ON frames (stored_at);
-- Added with issue 15: an older store gains it in place (IF NOT EXISTS) when the daemon
-- opens it; its frames simply have no particle rows.
CREATE TABLE IF NOT EXISTS particles (
    frame_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    label TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    confidence REAL NOT NULL,
    x INTEGER NOT NULL,
    y INTEGER NOT NULL,
    w INTEGER NOT NULL,
    h INTEGER NOT NULL,
    area REAL,
    ecd REAL,
    feret_max REAL,
    feret_min REAL,
    aspect_ratio REAL,
    unit TEXT,
    PRIMARY KEY (frame_id, idx)
) WITHOUT ROWID;
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
class ParticleSizeRow:
    """A particle's size and shape as stored (see `monitor.imaging.particle_size`)."""

    area: float
    ecd: float
    feret_max: float
    feret_min: float
    aspect_ratio: float
    unit: str
    """Of the lengths: "um", or "px" when the probe has no pixel size; area in unit²."""


@dataclass(frozen=True)
class ParticleRow:
    """One classified particle of a frame: the model's call and the particle's size."""

    label: str
    """The model's top class (also for an uncertain call, which no fraction counts)."""
    status: str  # "ok" or "uncertain"
    reason: str | None  # why uncertain: "low_confidence" or "out_of_distribution"
    confidence: float
    box: tuple[int, int, int, int]
    """x, y, w, h in frame pixels."""
    size: ParticleSizeRow | None = None
    """None where the sampler segments no object (tiles) or gave no mask."""


@dataclass(frozen=True)
class StoredParticle:
    """A particle read back with its frame's identity (for export)."""

    probe: str
    key: str
    ts: float
    batch: str | None
    particle: ParticleRow


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
    model: dict[str, str] | None = None
    """The model that classified the frame: {"name", "version", "sha256"}; None when no
    model saw it (rejected, unreadable) or for rows written before models were recorded."""
    journal: bool = True  # files are journaled; stream frames have no file to remember
    particles: tuple[ParticleRow, ...] = ()
    """Its particles, stored in the same transaction (in `frames_since` only when asked)."""


class StoreError(Exception):
    """The store file cannot be used as it is; the message names the file and the fix."""


# SQLite result codes (the low byte of sqlite_errorcode) that pass: another writer, a
# full disk, an I/O error, no memory. Anything else is a fault of the data or the code.
_TRANSIENT_SQLITE_CODES = frozenset({5, 6, 7, 10, 13, 14})  # BUSY LOCKED NOMEM IOERR FULL CANTOPEN
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EMFILE,
        errno.ENFILE,
        errno.EAGAIN,
        errno.ENOMEM,
        errno.EACCES,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.EROFS,
    }
)


def is_transient(exc: BaseException) -> bool:
    """Whether a write that failed with `exc` may succeed if simply tried again later."""
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _TRANSIENT_SQLITE_CODES
        text = str(exc).lower()
        words = ("locked", "busy", "full", "disk i/o", "unable to open")
        return any(word in text for word in words)
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return isinstance(exc, MemoryError)


def storable_text(text: str) -> str:
    """`text` as SQLite can store it: a file name that is not valid UTF-8 arrives from
    os.fsdecode with lone surrogates, which become backslash escapes (b'\\xff' -> '\\xff').
    The same name always maps to the same text, so the journal still matches it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


@dataclass
class StoreTransaction:
    """An open BEGIN IMMEDIATE on the store's connection.

    Other tables in the same file (the MQTT outbox) write through `connection` so that
    they commit or roll back together with the frames; `after_commit` hooks run only
    once COMMIT succeeded, to update what their owners keep in memory.
    """

    connection: sqlite3.Connection
    _after: list[Callable[[], None]] = field(default_factory=list)
    scratch: dict[str, Any] = field(default_factory=dict)
    """Per-transaction notes of the writers that share it (the outbox's staged count)."""

    def after_commit(self, hook: Callable[[], None]) -> None:
        self._after.append(hook)


class Store:
    """One connection guarded by a lock: writes are short, readers use their own handle."""

    def __init__(self, state_dir: Path, *, readonly: bool = False) -> None:
        self.path = state_dir / DB_FILE
        try:
            self._db = self._open(state_dir, readonly)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and is_transient(exc):
                raise StoreError(f"the store {self.path} cannot be opened: {exc}") from exc
            raise StoreError(
                f"the store {self.path} is not a readable SQLite database ({exc}): it is"
                f" damaged. Move it aside (mv {self.path} {self.path}.damaged, and its -wal"
                " and -shm files with it) and start again: the daemon then begins a new"
                " store, and probe files are journaled afresh (keep them or use backlog ="
                " 'none' to avoid counting old files twice)."
            ) from exc
        # A read-only view of a store from an older version lacks the newer columns.
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(frames)")}
        n_ood = "n_ood" if "n_ood" in columns else "0"
        model = "model" if "model" in columns else "NULL"
        self._frame_columns = (
            "probe, key, ts, batch, status, reason, counts, n_uncertain, stored_at,"
            f" latency_s, {n_ood}, {model}"
        )
        # ... and a store written before issue 15 has no particles table.
        self._has_particles = (
            self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'particles'"
            ).fetchone()
            is not None
        )
        # Re-entrant: a transaction's owner may call the other methods inside it.
        self._lock = threading.RLock()

    def _open(self, state_dir: Path, readonly: bool) -> sqlite3.Connection:
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no store at {self.path} (has the daemon run yet?)")
            uri = f"file:{self.path}?mode=ro"
            db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return db
        state_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        _add_missing_columns(db)
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StoreTransaction]:
        """BEGIN IMMEDIATE ... COMMIT under the store's lock; after-commit hooks run last."""
        with self._lock:
            tx = StoreTransaction(self._db)
            with self._transaction():
                yield tx
        for hook in tx._after:
            try:
                hook()
            except Exception:  # the data is committed; a hook's failure must not undo that
                log.exception("store_after_commit_failed")

    # -- journal -------------------------------------------------------------------

    def journaled_keys(self, probe: str) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT key FROM files WHERE probe = ?", (probe,))
            return {key for (key,) in rows}

    def journaled(self, probe: str, keys: Sequence[str]) -> set[str]:
        """Which of `keys` the journal holds (one indexed lookup each, in chunks)."""
        found: set[str] = set()
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = [storable_text(key) for key in keys[start : start + 500]]
                marks = ",".join("?" * len(chunk))
                found.update(
                    key
                    for (key,) in self._db.execute(
                        f"SELECT key FROM files WHERE probe = ? AND key IN ({marks})",
                        (probe, *chunk),
                    )
                )
        return found

    def record_skipped(self, probe: str, keys: Iterable[str], reason: str, now: float) -> None:
        """Journal files that will deliberately never be processed (backlog policy)."""
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO files VALUES (?, ?, 'skipped', ?, ?)",
                [(probe, storable_text(key), reason, now) for key in keys],
            )

    def record_frames(
        self, rows: Sequence[FrameRow], tx: StoreTransaction | None = None
    ) -> list[bool]:
        """Store frames and journal their files in one transaction (`tx`, or one of its own).

        Returns, per row, whether it was added. A frame whose file is already journaled
        (before, or earlier in `rows`) is ignored: that is the exactly-once guarantee
        when a file is seen twice (event plus rescan, or after a restart).
        """
        if tx is None:
            with self.transaction() as own:
                return self.record_frames(rows, own)
        added: list[bool] = []
        db = tx.connection
        for row in rows:
            key = storable_text(row.key)
            reason = None if row.reason is None else storable_text(row.reason)
            if row.journal:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO files VALUES (?, ?, ?, ?, ?)",
                    (row.probe, key, row.status, reason, row.stored_at),
                )
                if cursor.rowcount == 0:
                    added.append(False)
                    continue
            cursor = db.execute(
                "INSERT INTO frames (probe, key, ts, batch, status, reason, counts,"
                " n_uncertain, stored_at, latency_s, n_ood, model)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.probe,
                    key,
                    row.ts,
                    row.batch,
                    row.status,
                    reason,
                    json.dumps(row.counts),
                    row.n_uncertain,
                    row.stored_at,
                    row.latency_s,
                    row.n_ood,
                    None if row.model is None else json.dumps(row.model),
                ),
            )
            if row.particles:
                frame_id = cursor.lastrowid
                db.executemany(
                    "INSERT INTO particles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_particle_values(frame_id, i, p) for i, p in enumerate(row.particles)],
                )
            added.append(True)
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

    def frames_since(self, probe: str, since: float, *, particles: bool = False) -> list[FrameRow]:
        """Frames newer than `since`, oldest first: used to refill windows after a restart.
        With `particles`, each with its particle rows."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, {self._frame_columns} FROM frames WHERE probe = ? AND ts > ?"
                " ORDER BY ts",
                (probe, since),
            ).fetchall()
            by_frame: dict[int, list[ParticleRow]] = {}
            if particles and self._has_particles and rows:
                for frame_id, *values in self._db.execute(
                    f"SELECT frame_id, {_PARTICLE_COLUMNS} FROM particles WHERE frame_id IN"
                    " (SELECT id FROM frames WHERE probe = ? AND ts > ?)"
                    " ORDER BY frame_id, idx",
                    (probe, since),
                ):
                    by_frame.setdefault(frame_id, []).append(_particle_row(values))
        return [
            replace(_frame_row(row[1:]), particles=tuple(by_frame.get(row[0], ()))) for row in rows
        ]

    def purge(self, older_than: float, particles_older_than: float | None = None) -> int:
        """Drop frame rows, snapshots and journal entries recorded before `older_than`,
        and particle rows of frames recorded before `particles_older_than` (default the
        same; they are by far the bulkiest rows, so a plant keeps them shorter).

        By the time of recording, not the frame time from a file name: a file named
        with an old (or future) time is kept for the full retention like any other.
        A journal entry goes with its frame: a file still in the folder after that is
        older than the retention, which the folder source skips by its mtime.
        """
        with self._lock, self._transaction():
            # A frame's particles go with it at the latest (they have no time of their own).
            # Frame ids grow in recording order, so "every frame recorded before the
            # cut-off" is "frame_id up to the newest such id": a range on the particles'
            # key, which stays cheap when weeks of frames are kept past their particles.
            particle_cutoff = max(older_than, particles_older_than or older_than)
            newest_old = self._db.execute(
                "SELECT id FROM frames WHERE stored_at < ? ORDER BY stored_at DESC LIMIT 1",
                (particle_cutoff,),
            ).fetchone()  # one step down the stored_at index
            if self._has_particles and newest_old is not None:
                self._db.execute("DELETE FROM particles WHERE frame_id <= ?", (newest_old[0],))
            frames = self._db.execute(
                "DELETE FROM frames WHERE stored_at < ?", (older_than,)
            ).rowcount
            windows = self._db.execute("DELETE FROM windows WHERE ts < ?", (older_than,)).rowcount
            files = self._db.execute(
                "DELETE FROM files WHERE recorded_at < ?", (older_than,)
            ).rowcount
        return frames + windows + files

    # -- reading back -------------------------------------------------------------

    def iter_frames(self, since: float = 0.0) -> Iterator[FrameRow]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._frame_columns} FROM frames WHERE ts >= ? ORDER BY id",
                (since,),
            ).fetchall()
        return (_frame_row(row) for row in rows)

    def iter_particles(self, since: float = 0.0, chunk: int = 5000) -> Iterator[StoredParticle]:
        """Every stored particle of the frames from `since` on (frame time), in the order
        the frames were stored; none from a store written before particles were kept.
        Read `chunk` rows at a time: a long retention holds far more particles than fit
        in memory at once."""
        if not self._has_particles:
            return
        with self._lock:
            cursor = self._db.execute(
                f"SELECT f.probe, f.key, f.ts, f.batch, {_PARTICLE_COLUMNS_OF_P}"
                " FROM frames AS f JOIN particles AS p ON p.frame_id = f.id"
                " WHERE f.ts >= ? ORDER BY f.id, p.idx",
                (since,),
            )
        while True:
            with self._lock:
                rows = cursor.fetchmany(chunk)
            if not rows:
                return
            for probe, key, ts, batch, *values in rows:
                yield StoredParticle(probe, key, ts, batch, _particle_row(values))

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
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()  # a failed COMMIT (disk full) leaves the transaction open
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR).
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")


def _frame_row(row: tuple[Any, ...]) -> FrameRow:
    (
        probe,
        key,
        ts,
        batch,
        status,
        reason,
        counts,
        n_uncertain,
        stored_at,
        latency_s,
        n_ood,
        model,
    ) = row
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
        model=None if model is None else json.loads(model),
    )


_PARTICLE_COLUMNS = (
    "label, status, reason, confidence, x, y, w, h, area, ecd, feret_max, feret_min,"
    " aspect_ratio, unit"
)


_PARTICLE_COLUMNS_OF_P = ", ".join(f"p.{name.strip()}" for name in _PARTICLE_COLUMNS.split(","))


def _particle_values(frame_id: int | None, index: int, particle: ParticleRow) -> tuple[Any, ...]:
    size = particle.size
    sizes: tuple[Any, ...] = (
        (None,) * 6
        if size is None
        else (size.area, size.ecd, size.feret_max, size.feret_min, size.aspect_ratio, size.unit)
    )
    return (
        frame_id,
        index,
        particle.label,
        particle.status,
        particle.reason,
        particle.confidence,
        *particle.box,
        *sizes,
    )


def _particle_row(values: Sequence[Any]) -> ParticleRow:
    label, status, reason, confidence, x, y, w, h, area, ecd, fmax, fmin, aspect, unit = values
    size = None
    if ecd is not None:
        size = ParticleSizeRow(area, ecd, fmax, fmin, aspect, unit)
    return ParticleRow(label, status, reason, confidence, (x, y, w, h), size)


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a store written by an older version up to the current schema, in place.

    Only columns with defaults are ever added, so old rows read as they always did.
    """
    columns = {row[1] for row in db.execute("PRAGMA table_info(frames)")}
    if "n_ood" not in columns:
        db.execute("ALTER TABLE frames ADD COLUMN n_ood INTEGER NOT NULL DEFAULT 0")
    if "model" not in columns:
        db.execute("ALTER TABLE frames ADD COLUMN model TEXT")
