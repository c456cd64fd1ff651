"""The shadow comparison's record: one row per compared frame and one per labelled review
crop the candidate was scored on, in <daemon.state_dir>/shadow/shadow.sqlite.

Frames are kept raw, not pre-aggregated, so `crystal-monitor shadow report` can cut any
time range into windows of any length afterwards. WAL mode: the report reads while the
daemon writes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from monitor.shadow.comparison import FrameComparison
from monitor.sqlite_file import immediate_transaction, open_shared

DB_FILE = "shadow.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY,
    probe TEXT NOT NULL,
    frame_key TEXT NOT NULL,
    ts REAL NOT NULL,
    live_model TEXT NOT NULL,
    candidate_model TEXT NOT NULL,
    classes TEXT NOT NULL,
    crops INTEGER NOT NULL,
    agreed INTEGER NOT NULL,
    live_counts TEXT NOT NULL,
    candidate_counts TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS frames_ts ON frames (ts);
CREATE TABLE IF NOT EXISTS labelled (
    sample_id INTEGER NOT NULL,
    candidate_model TEXT NOT NULL,
    guess TEXT NOT NULL,
    status TEXT NOT NULL,
    scored_at REAL NOT NULL,
    PRIMARY KEY (sample_id, candidate_model)
) WITHOUT ROWID;
"""


class ShadowStoreError(Exception):
    """The shadow record cannot be opened; the message names the fix."""


@dataclass(frozen=True)
class CandidateCall:
    """What the candidate made of one labelled review crop."""

    sample_id: int
    guess: str
    status: str


class ShadowStore:
    def __init__(self, folder: Path, *, create: bool = True) -> None:
        path = Path(folder) / DB_FILE
        if not create and not path.is_file():
            raise ShadowStoreError(
                f"no shadow record at {path}: the daemon writes it while [model.shadow] is set "
                "(check daemon.state_dir or --state-dir)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = open_shared(path)
        self._db.executescript(_SCHEMA)

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._lock, self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add_frames(
        self,
        rows: Sequence[tuple[FrameComparison, str, str, str, tuple[str, ...]]],
        recorded_at: float,
    ) -> None:
        """(comparison, frame key, live model, candidate model, classes) per frame."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO frames (probe, frame_key, ts, live_model, candidate_model, classes, "
                "crops, agreed, live_counts, candidate_counts, recorded_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        c.probe,
                        key,
                        c.ts,
                        live,
                        candidate,
                        json.dumps(list(classes)),
                        c.crops,
                        c.agreed,
                        json.dumps(list(c.live_counts)),
                        json.dumps(list(c.candidate_counts)),
                        recorded_at,
                    )
                    for c, key, live, candidate, classes in rows
                ],
            )

    def frames(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        candidate_model: str | None = None,
    ) -> list[tuple[FrameComparison, str, str]]:
        """(comparison, live model, candidate model) per frame, in time order."""
        where, values = ["1 = 1"], []
        for clause, value in (
            ("ts >= ?", since),
            ("ts < ?", until),
            ("candidate_model = ?", candidate_model),
        ):
            if value is not None:
                where.append(clause)
                values.append(value)
        with self._lock:
            rows = self._db.execute(
                "SELECT probe, ts, crops, agreed, live_counts, candidate_counts, live_model, "
                f"candidate_model FROM frames WHERE {' AND '.join(where)} ORDER BY ts, id",
                values,
            ).fetchall()
        return [
            (
                FrameComparison(
                    probe, ts, crops, agreed, tuple(json.loads(live)), tuple(json.loads(cand))
                ),
                live_model,
                candidate_model,
            )
            for probe, ts, crops, agreed, live, cand, live_model, candidate_model in rows
        ]

    def candidates(self) -> list[str]:
        """The candidate models on record, the most recent last."""
        with self._lock:
            rows = self._db.execute(
                "SELECT candidate_model, MAX(ts) AS last FROM frames GROUP BY candidate_model "
                "ORDER BY last"
            ).fetchall()
        return [str(row[0]) for row in rows]

    def add_labelled(self, candidate_model: str, calls: Sequence[CandidateCall], at: float) -> None:
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO labelled (sample_id, candidate_model, guess, status, "
                "scored_at) VALUES (?, ?, ?, ?, ?)",
                [(c.sample_id, candidate_model, c.guess, c.status, at) for c in calls],
            )

    def labelled(self, candidate_model: str) -> dict[int, CandidateCall]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sample_id, guess, status FROM labelled WHERE candidate_model = ?",
                (candidate_model,),
            ).fetchall()
        return {int(i): CandidateCall(int(i), str(g), str(s)) for i, g, s in rows}

    def last_scored(self, candidate_model: str) -> int:
        with self._lock:
            (last,) = self._db.execute(
                "SELECT COALESCE(MAX(sample_id), 0) FROM labelled WHERE candidate_model = ?",
                (candidate_model,),
            ).fetchone()
        return int(last)

    def classes(self) -> tuple[str, ...] | None:
        """The class list of the newest compared frame; None before the first."""
        with self._lock:
            row = self._db.execute("SELECT classes FROM frames ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else tuple(json.loads(row[0]))
