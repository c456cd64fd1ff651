"""The recorder, the store and the folder source's journal, on a real SQLite file.

Per-frame isolation, results committed with their frames (the outbox in the store's
file), the import of an older separate outbox, the bounded memory of processed names
and the purge of the journal with the retention.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitor.config.settings import FolderSourceConfig
from monitor.log_limit import RepeatLimiter
from monitor.pipeline.outcome import FrameOutcome
from monitor.pipeline.recorder import Recorder
from monitor.publishers.outbox import LEGACY_OUTBOX_FILE, Outbox
from monitor.sources.base import FrameItem
from monitor.sources.folder import FolderSource
from monitor.store import DB_FILE, FrameRow, Store, StoreTransaction, storable_text
from tests.daemon_process import wait_for

CLASSES = ("CEX", "PG")


def _outcome(key: str, after: list[str] | None = None) -> FrameOutcome:
    def read() -> np.ndarray:
        raise AssertionError("not read here")

    item = FrameItem(
        probe="R1",
        key=key,
        ts=1000.0,
        read=read,
        after_store=None if after is None else (lambda: after.append(key)),
    )
    return FrameOutcome(item, "ok", None, (2, 1), 0)


class _FailingStore(Store):
    """A real store whose write fails for one key (a fault of that frame's data)."""

    def __init__(self, state_dir: Path, bad_key: str) -> None:
        super().__init__(state_dir)
        self.bad_key = bad_key

    def record_frames(self, rows: Any, tx: StoreTransaction | None = None) -> list[bool]:
        if any(row.key == self.bad_key and row.status == "ok" for row in rows):
            raise ValueError("this frame cannot be stored")
        return super().record_frames(rows, tx)


def _recorder(store: Store, **kwargs: Any) -> tuple[Recorder, list[str]]:
    recorded: list[str] = []

    def on_recorded(outcome: FrameOutcome) -> None:
        recorded.append(outcome.item.key)

    recorder = Recorder(
        store, CLASSES, batch_of=lambda probe: None, on_recorded=on_recorded, **kwargs
    )
    return recorder, recorded


def test_one_bad_frame_is_recorded_as_an_error_and_its_group_is_stored(tmp_path: Path) -> None:
    store = _FailingStore(tmp_path, bad_key="bad.png")
    recorder, recorded = _recorder(store, max_delay_s=0.5)
    moved: list[str] = []
    recorder.start()
    for index in range(30):
        recorder.submit(_outcome("bad.png" if index == 7 else f"f{index:02d}.png", moved))
    recorder.stop()
    rows = {row.key: row for row in store.iter_frames()}
    assert len(rows) == 30
    assert rows["bad.png"].status == "error"
    assert rows["bad.png"].reason == "store: this frame cannot be stored"
    assert rows["bad.png"].counts == {"CEX": 0, "PG": 0}
    assert {row.status for key, row in rows.items() if key != "bad.png"} == {"ok"}
    assert sorted(recorded) == sorted(rows)
    assert sorted(moved) == sorted(rows)  # every file, the bad one too, moved on once
    counts = recorder.counts()
    assert counts.store_failures == {"this frame cannot be stored": 1}
    assert counts.unstorable == 0
    assert recorder.problem is None  # not a passing failure: nothing to wait for


def test_groups_of_outcomes_are_recorded_once_in_order_within_a_bound_in_frames(
    tmp_path: Path,
) -> None:
    """A group handed over in one step is let in while the queue holds fewer frames
    than its bound; the next waits until the recorder has taken them, and every frame
    is recorded once, in the order handed over."""
    store = Store(tmp_path)
    recorder, recorded = _recorder(store, queue_outcomes=4)
    recorder.submit_many([_outcome(f"a{index}.png") for index in range(6)])  # room: let in
    second = threading.Thread(
        target=recorder.submit_many, args=([_outcome(f"b{index}.png") for index in range(3)],)
    )
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # 6 frames queued, bound 4: waits for the store
    recorder.start()
    second.join(timeout=10)
    assert not second.is_alive()
    recorder.submit(_outcome("c.png"))
    recorder.stop()
    keys = [f"a{index}.png" for index in range(6)] + [f"b{index}.png" for index in range(3)]
    assert recorded == [*keys, "c.png"]
    assert recorder.recorded == 10
    store.close()


def test_a_locked_database_holds_frames_back_reports_why_and_loses_nothing(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path)
    store._db.execute("PRAGMA busy_timeout=200")  # fail fast while locked
    recorder, recorded = _recorder(store)
    holder = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    recorder.start()
    for index in range(20):
        recorder.submit(_outcome(f"f{index:02d}.png"))
    assert wait_for(lambda: recorder.problem is not None, timeout=10, interval=0.05)
    assert "database is locked" in (recorder.problem or "")
    assert recorded == []
    holder.execute("ROLLBACK")
    holder.close()
    assert wait_for(lambda: len(recorded) == 20, timeout=20, interval=0.05)
    assert recorder.problem is None
    recorder.stop()
    assert len(list(store.iter_frames())) == 20
    assert sum(recorder.counts().store_failures.values()) >= 1


def test_results_commit_with_their_frames_or_not_at_all(tmp_path: Path) -> None:
    store = Store(tmp_path)
    outbox = Outbox(tmp_path, max_events=1000)

    def stage(tx: StoreTransaction, results: Any) -> None:
        for probe, result in results:
            outbox.append(probe, "results", "t/R1/results", result, tx=tx)
            if result["key"] == "boom.png":
                raise ValueError("a fault inside the transaction")

    recorder, _ = _recorder(store, stage_results=stage)
    recorder.start()
    for key in ("a.png", "b.png", "boom.png", "c.png"):
        recorder.submit(_outcome(key))
    recorder.stop()
    frames = {row.key: row.status for row in store.iter_frames()}
    assert frames == {"a.png": "ok", "b.png": "ok", "boom.png": "error", "c.png": "ok"}
    messages = outbox.pending(0, 100)
    # boom.png's ok result rolled back with its ok row; its error row has no result
    # (recorded with staging off), so seqs stay contiguous over what was kept.
    assert [m.seq for m in messages] == [1, 2, 3]
    assert sorted(json.loads(m.payload)["key"] for m in messages) == [
        "a.png",
        "b.png",
        "c.png",
    ]
    assert outbox.stats().backlog == 3
    assert outbox.last_seq("R1", "results") == 3
    outbox.close()
    store.close()


def test_an_older_separate_outbox_is_imported_once(tmp_path: Path) -> None:
    legacy = sqlite3.connect(tmp_path / LEGACY_OUTBOX_FILE)
    legacy.executescript(
        """
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, probe TEXT, stream TEXT,
            seq INTEGER, topic TEXT, payload BLOB, drop_priority INTEGER, created REAL);
        CREATE TABLE sequences (probe TEXT, stream TEXT, last INTEGER,
            PRIMARY KEY (probe, stream));
        CREATE TABLE retained (topic TEXT PRIMARY KEY, payload BLOB, updated REAL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER);
        INSERT INTO messages (probe, stream, seq, topic, payload, drop_priority, created)
            VALUES ('R1', 'events', 41, 't/R1/events', x'7b7d', 1, 1.0),
                   ('R1', 'events', 42, 't/R1/events', x'7b7d', 1, 2.0);
        INSERT INTO sequences VALUES ('R1', 'events', 42), ('R1', 'results', 900);
        INSERT INTO retained VALUES ('t/R1/fractions', x'7b7d', 3.0);
        INSERT INTO counters VALUES ('dropped_results', 5);
        """
    )
    legacy.commit()
    legacy.close()
    outbox = Outbox(tmp_path, max_events=100)
    assert [m.seq for m in outbox.pending(0, 10)] == [41, 42]
    assert outbox.append("R1", "events", "t/R1/events", {}) == 43
    assert outbox.last_seq("R1", "results") == 900
    assert outbox.retained() == {"t/R1/fractions": b"{}"}
    assert outbox.stats().dropped == {"events": 0, "results": 5}
    outbox.close()
    assert not (tmp_path / LEGACY_OUTBOX_FILE).exists()
    assert (tmp_path / "outbox.sqlite.imported").exists()
    reopened = Outbox(tmp_path, max_events=100)  # not imported twice
    assert [m.seq for m in reopened.pending(0, 10)] == [41, 42, 43]
    reopened.close()


class _ListSink:
    def __init__(self) -> None:
        self.items: list[FrameItem] = []
        self._lock = threading.Lock()

    def put(self, item: FrameItem, *, block: bool) -> bool:
        with self._lock:
            self.items.append(item)
        return True


def _folder_source(folder: Path, store: Store, retention_s: float, **config: Any) -> FolderSource:
    source_config = FolderSourceConfig.model_validate(
        {"type": "folder", "path": folder, "settle_time": 0.2, "rescan_interval": 0.5, **config}
    )
    return FolderSource(
        "R1",
        source_config,
        journaled=lambda keys: store.journaled("R1", keys),
        record_skipped=lambda keys, reason: store.record_skipped("R1", keys, reason, time.time()),
        retention_s=lambda: retention_s,
    )


def _journal(store: Store, keys: list[str]) -> None:
    store.record_frames(
        [FrameRow("R1", key, 0.0, None, "ok", None, {}, 0, time.time()) for key in keys]
    )


def test_names_of_files_gone_from_the_folder_are_forgotten(tmp_path: Path) -> None:
    """The source keeps names only while their files are in the folder (before: every
    name ever processed, about 52 MB a day at 5 frames/s)."""
    folder = tmp_path / "probe"
    folder.mkdir()
    store = Store(tmp_path / "state")
    names = [f"crop_{i:04d}.png" for i in range(300)]
    for name in names:
        (folder / name).write_bytes(b"png")
    _journal(store, names)
    source = _folder_source(folder, store, retention_s=0)
    sink = _ListSink()
    source.start(sink)
    try:
        assert wait_for(lambda: source.remembered_names == 300, timeout=10, interval=0.1)
        for name in names[:250]:
            (folder / name).unlink()  # moved away by the plant's archiver
        assert wait_for(lambda: source.remembered_names == 50, timeout=10, interval=0.1)
        (folder / names[0]).write_bytes(b"png")  # the same name again: the journal knows it
        time.sleep(1.5)
    finally:
        source.stop()
    assert sink.items == []
    store.close()


def test_a_file_older_than_the_retention_whose_journal_entry_was_purged_is_skipped(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "probe"
    folder.mkdir()
    store = Store(tmp_path / "state")
    for name in ("old.png", "new.png"):
        (folder / name).write_bytes(b"png")
    long_ago = time.time() - 10 * 86400
    os.utime(folder / "old.png", (long_ago, long_ago))
    source = _folder_source(folder, store, retention_s=86400)
    sink = _ListSink()
    source.start(sink)
    try:
        assert wait_for(lambda: len(sink.items) == 1, timeout=10, interval=0.1)
    finally:
        source.stop()
    assert [item.key for item in sink.items] == ["new.png"]
    assert store.journaled("R1", ["old.png", "new.png"]) == {"old.png"}
    store.close()


def test_storable_text_escapes_only_names_that_are_not_utf8() -> None:
    assert storable_text("crop_é.png") == "crop_é.png"
    raw = os.fsdecode(b"crop_\xe9.png")
    assert storable_text(raw) == "crop_\\xe9.png"
    assert storable_text(storable_text(raw)) == storable_text(raw)


def test_repeat_limiter_reports_once_per_interval_with_the_count() -> None:
    now = [0.0]
    limiter = RepeatLimiter(60.0, clock=lambda: now[0])
    assert limiter.due("disk full") == 1
    assert [limiter.due("disk full") for _ in range(5)] == [0] * 5
    assert limiter.due("locked") == 1  # another reason is news
    now[0] = 61.0
    assert limiter.due("disk full") == 6
    limiter.reset()
    assert limiter.due("disk full") == 1


@pytest.mark.parametrize("retention_s", [86400.0])
def test_purge_drops_journal_entries_with_their_rows(tmp_path: Path, retention_s: float) -> None:
    store = Store(tmp_path)
    now = time.time()
    store.record_frames(
        [
            FrameRow("R1", "old.png", now, None, "ok", None, {}, 0, now - 2 * retention_s),
            FrameRow("R1", "new.png", 0.0, None, "ok", None, {}, 0, now),
        ]
    )
    assert store.purge(now - retention_s) == 2  # old.png's row and its journal entry
    assert store.journaled("R1", ["old.png", "new.png"]) == {"new.png"}
    assert [row.key for row in store.iter_frames()] == ["new.png"]
    store.close()


def test_a_store_from_before_models_were_recorded_gains_the_column_in_place(
    tmp_path: Path,
) -> None:
    """An older store (no `model` column) opens, old rows read back with no model, and new
    rows name theirs; a read-only view of the old file reads it as it is."""
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.executescript(
        """
        CREATE TABLE frames (id INTEGER PRIMARY KEY, probe TEXT NOT NULL, key TEXT NOT NULL,
            ts REAL NOT NULL, batch TEXT, status TEXT NOT NULL, reason TEXT,
            counts TEXT NOT NULL, n_uncertain INTEGER NOT NULL, stored_at REAL NOT NULL,
            latency_s REAL, n_ood INTEGER NOT NULL DEFAULT 0);
        INSERT INTO frames (probe, key, ts, status, counts, n_uncertain, stored_at)
            VALUES ('R1', 'old.png', 100.0, 'ok', '{"CEX": 3}', 0, 100.5);
        """
    )
    db.commit()
    db.close()
    readonly = Store(tmp_path, readonly=True)
    (old,) = list(readonly.iter_frames())
    assert old.key == "old.png" and old.model is None
    readonly.close()

    store = Store(tmp_path)
    identity = {"name": "site-b", "version": "2", "sha256": "ab" * 32}
    row = FrameRow("R1", "new.png", 200.0, None, "ok", None, {"CEX": 1}, 0, 200.5, model=identity)
    assert store.record_frames([row]) == [True]
    rows = {r.key: r.model for r in store.iter_frames()}
    store.close()
    assert rows == {"old.png": None, "new.png": identity}
