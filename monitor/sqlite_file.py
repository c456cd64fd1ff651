"""The small SQLite files beside the main store (the review queue's samples, the shadow
record): one connection shared by the daemon's threads, WAL so a CLI report or export
reads while the daemon writes, and writes as immediate transactions under a lock."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

BUSY_TIMEOUT_MS = 5000


def open_shared(path: Path) -> sqlite3.Connection:
    """A connection any thread may use (under the caller's lock), in autocommit mode so
    transactions are explicit, WAL, waiting up to 5 s for another process's lock."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode=WAL")
    return db


@contextlib.contextmanager
def immediate_transaction(
    lock: threading.Lock, db: sqlite3.Connection
) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT under `lock`; rolled back on any exception."""
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
