"""The review queue's store: kept crops as PNG files beside one SQLite file, under
<daemon.state_dir>/samples.

One row per kept crop: where it came from (probe, frame key, frame time, batch, box),
what the live model made of it (model, guess, confidence, probabilities, status, why
uncertain), why it was kept, and the operator's label with who gave it and when. The
store holds at most `max_samples` crops: the oldest unlabelled crop goes first, a
labelled one only when nothing unlabelled is left (labels cost an operator's time).
What the selection kept, turned away at its caps and dropped is recorded per hour.

WAL mode: the daemon writes while `crystal-monitor samples export/import` runs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from monitor.review.selection import HourTally
from monitor.sqlite_file import immediate_transaction, open_shared
from monitor.timestamps import iso_utc

log = structlog.get_logger(__name__)

DB_FILE = "samples.sqlite"
IMAGE_DIR = "images"
NOT_A_PARTICLE = "_not_a_particle"
UNLABELLED = "_unlabelled"
LABELS_CSV = "labels.csv"
SELECTION_CSV = "selection.csv"
_EXPORTED_NAME = re.compile(r"^sample-(\d+)\.png$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    probe TEXT NOT NULL,
    frame_key TEXT NOT NULL,
    ts REAL NOT NULL,
    batch TEXT,
    bbox TEXT NOT NULL,
    model TEXT NOT NULL,
    guess TEXT NOT NULL,
    confidence REAL NOT NULL,
    probabilities TEXT NOT NULL,
    status TEXT NOT NULL,
    decision_reason TEXT,
    ood_score REAL,
    kept_because TEXT NOT NULL,
    kept_at REAL NOT NULL,
    label TEXT,
    labelled_by TEXT,
    labelled_at REAL
);
CREATE INDEX IF NOT EXISTS samples_probe_ts ON samples (probe, ts);
CREATE INDEX IF NOT EXISTS samples_unlabelled ON samples (label, id);
CREATE INDEX IF NOT EXISTS samples_frame ON samples (probe, frame_key);
CREATE TABLE IF NOT EXISTS selection (
    hour REAL NOT NULL,
    reason TEXT NOT NULL,
    kept INTEGER NOT NULL,
    over_cap INTEGER NOT NULL,
    dropped INTEGER NOT NULL,
    PRIMARY KEY (hour, reason)
) WITHOUT ROWID;
"""


class SampleStoreError(Exception):
    """The sample store cannot be opened or used as asked; the message names the fix."""


@dataclass(frozen=True)
class NewSample:
    """A crop the queue decided to keep, before it has an id."""

    probe: str
    frame_key: str
    ts: float
    batch: str | None
    bbox: tuple[int, int, int, int]
    model: str
    guess: str
    confidence: float
    probabilities: dict[str, float]
    status: str
    decision_reason: str | None
    ood_score: float | None
    kept_because: str
    kept_at: float


@dataclass(frozen=True)
class Sample:
    """A kept crop as the labelling page and the export see it."""

    id: int
    probe: str
    frame_key: str
    ts: float
    batch: str | None
    bbox: tuple[int, int, int, int]
    model: str
    guess: str
    confidence: float
    probabilities: dict[str, float]
    status: str
    decision_reason: str | None
    ood_score: float | None
    kept_because: str
    kept_at: float
    label: str | None = None
    labelled_by: str | None = None
    labelled_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["bbox"] = list(self.bbox)
        return document


_COLUMNS = (
    "id, probe, frame_key, ts, batch, bbox, model, guess, confidence, probabilities, status, "
    "decision_reason, ood_score, kept_because, kept_at, label, labelled_by, labelled_at"
)


def _sample(row: Sequence[Any]) -> Sample:
    values = list(row)
    values[5] = tuple(json.loads(values[5]))
    values[9] = json.loads(values[9])
    return Sample(*values)


@dataclass(frozen=True)
class ExportSummary:
    folder: Path
    per_folder: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.per_folder.values())


@dataclass(frozen=True)
class ImportSummary:
    labelled: int
    unchanged: int
    not_in_store: int
    left_unlabelled: int


class SampleStore:
    """The kept crops of one daemon (`folder` = <state_dir>/samples).

    `classes` is the live model's class list: a label is one of them or
    "_not_a_particle". Opened by the daemon with its classes; by the CLI with
    `classes=None`, which reads the list the daemon recorded.
    """

    def __init__(
        self,
        folder: Path,
        classes: Sequence[str] | None,
        *,
        max_samples: int = 5000,
        create: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.images = self.folder / IMAGE_DIR
        self.max_samples = max_samples
        path = self.folder / DB_FILE
        if not create and not path.is_file():
            raise SampleStoreError(
                f"no review samples at {path}: the daemon keeps them there while "
                "review.enabled = true (check daemon.state_dir or --state-dir)"
            )
        self.images.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = open_shared(path)
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise SampleStoreError(
                f"{path} is not a usable sample store ({exc}): move it aside and restart "
                "the daemon to begin a new one"
            ) from exc
        recorded = self._meta("classes")
        if classes is None:
            if recorded is None:
                raise SampleStoreError(f"{path} records no class list; start the daemon once")
            self._classes = tuple(json.loads(recorded))
        else:
            self._classes = tuple(classes)
            if recorded is not None and tuple(json.loads(recorded)) != self._classes:
                log.warning(
                    "sample_store_classes_changed",
                    recorded=json.loads(recorded),
                    now=list(self._classes),
                    note="labels of the old classes are kept and exported as they are",
                )
            self._set_meta("classes", json.dumps(list(self._classes)))

    # -- plumbing -----------------------------------------------------------------
    def _meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, name: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._lock, self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    def _image_file(self, sample_id: int) -> Path:
        return self.images / f"{sample_id:08d}.png"

    # -- the queue's writes -------------------------------------------------------
    def add(self, sample: NewSample, image: np.ndarray) -> int:
        """Keep a crop; returns its id. Evicts beyond max_samples."""
        ok, png = cv2.imencode(".png", image)
        if not ok:
            raise SampleStoreError(f"crop of {sample.frame_key} could not be encoded as PNG")
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO samples (probe, frame_key, ts, batch, bbox, model, guess, "
                "confidence, probabilities, status, decision_reason, ood_score, kept_because, "
                "kept_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sample.probe,
                    sample.frame_key,
                    sample.ts,
                    sample.batch,
                    json.dumps(list(sample.bbox)),
                    sample.model,
                    sample.guess,
                    sample.confidence,
                    json.dumps(sample.probabilities),
                    sample.status,
                    sample.decision_reason,
                    sample.ood_score,
                    sample.kept_because,
                    sample.kept_at,
                ),
            )
            sample_id = int(cursor.lastrowid or 0)
            # The file before the commit: a row is never there without its crop.
            target = self._image_file(sample_id)
            partial = target.with_suffix(".part")
            partial.write_bytes(png.tobytes())
            os.replace(partial, target)
            evicted = self._evict(db)
        for old in evicted:
            self._image_file(old).unlink(missing_ok=True)
        return sample_id

    def _evict(self, db: sqlite3.Connection) -> list[int]:
        (count,) = db.execute("SELECT COUNT(*) FROM samples").fetchone()
        excess = int(count) - self.max_samples
        if excess <= 0:
            return []
        ids = [
            int(row[0])
            for row in db.execute(
                "SELECT id FROM samples ORDER BY label IS NOT NULL, id LIMIT ?", (excess,)
            )
        ]
        db.executemany("DELETE FROM samples WHERE id = ?", [(i,) for i in ids])
        return ids

    def add_tallies(self, tallies: Mapping[tuple[float, str], HourTally]) -> None:
        """Add the selection's counts per (hour, reason) to the record."""
        if not tallies:
            return
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO selection (hour, reason, kept, over_cap, dropped) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (hour, reason) DO UPDATE SET "
                "kept = kept + excluded.kept, over_cap = over_cap + excluded.over_cap, "
                "dropped = dropped + excluded.dropped",
                [
                    (hour, reason, t.kept, t.over_cap, t.dropped)
                    for (hour, reason), t in tallies.items()
                ],
            )

    def selection(self) -> list[dict[str, Any]]:
        """What the selection kept, capped and dropped, per hour and reason."""
        with self._lock:
            rows = self._db.execute(
                "SELECT hour, reason, kept, over_cap, dropped FROM selection ORDER BY hour, reason"
            ).fetchall()
        return [
            {"hour": h, "reason": r, "kept": k, "over_cap": c, "dropped": d}
            for h, r, k, c, d in rows
        ]

    # -- the labelling page's reads and writes --------------------------------------
    def list_samples(
        self,
        *,
        probe: str | None = None,
        kept_because: str | None = None,
        since: float | None = None,
        until: float | None = None,
        labelled: bool | None = None,
        limit: int = 200,
        after_id: int | None = None,
    ) -> list[Sample]:
        where, values = [], []
        for clause, value in (
            ("probe = ?", probe),
            ("kept_because = ?", kept_because),
            ("ts >= ?", since),
            ("ts <= ?", until),
            ("id > ?", after_id),
        ):
            if value is not None:
                where.append(clause)
                values.append(value)
        if labelled is not None:
            where.append("label IS NOT NULL" if labelled else "label IS NULL")
        sql = f"SELECT {_COLUMNS} FROM samples"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*values, limit)).fetchall()
        return [_sample(row) for row in rows]

    def get(self, sample_id: int) -> Sample | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM samples WHERE id = ?", (sample_id,)
            ).fetchone()
        return None if row is None else _sample(row)

    def image_path(self, sample_id: int) -> Path | None:
        return self._image_file(sample_id) if self.get(sample_id) is not None else None

    def image(self, sample_id: int) -> np.ndarray | None:
        """The kept crop, greyscale, or None when it is gone."""
        path = self.image_path(sample_id)
        if path is None:
            return None
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        return None if image is None else np.asarray(image)

    def set_label(self, sample_id: int, label: str, *, operator: str, at: float) -> Sample:
        """ValueError for a label that is no class; KeyError for an unknown id."""
        choices = (*self._classes, NOT_A_PARTICLE)
        if label not in choices:
            raise ValueError(f"label must be one of {', '.join(choices)}, not {label!r}")
        return self._update(sample_id, label, operator, at)

    def clear_label(self, sample_id: int) -> Sample:
        return self._update(sample_id, None, None, None)

    def _update(
        self, sample_id: int, label: str | None, operator: str | None, at: float | None
    ) -> Sample:
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE samples SET label = ?, labelled_by = ?, labelled_at = ? WHERE id = ?",
                (label, operator, at, sample_id),
            ).rowcount
        if not changed:
            raise KeyError(sample_id)
        sample = self.get(sample_id)
        if sample is None:  # evicted between the two statements
            raise KeyError(sample_id)
        return sample

    def label_counts(self) -> dict[str, int]:
        counts = dict.fromkeys((*self._classes, NOT_A_PARTICLE), 0)
        with self._lock:
            rows = self._db.execute(
                "SELECT label, COUNT(*) FROM samples WHERE label IS NOT NULL GROUP BY label"
            ).fetchall()
        counts.update({str(label): int(n) for label, n in rows})
        return counts

    def queue_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT kept_because, COUNT(*) FROM samples WHERE label IS NULL "
                "GROUP BY kept_because"
            ).fetchall()
        return {str(reason): int(n) for reason, n in rows}

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM samples").fetchone()
        return int(n)

    def labelled(self, *, after_id: int = 0, limit: int = 1000) -> list[Sample]:
        """Labelled crops in id order, from after `after_id` (for the shadow's accuracy)."""
        return self.list_samples(labelled=True, after_id=after_id, limit=limit)

    # -- export and import ------------------------------------------------------------
    def export(self, folder: Path, *, labelled_only: bool = False) -> ExportSummary:
        """An ImageFolder: one folder per class, `_not_a_particle/`, and (unless
        `labelled_only`) `_unlabelled/`; `labels.csv` says who labelled what and when,
        `selection.csv` what the selection kept and turned away per hour."""
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise SampleStoreError(
                f"{folder} is not empty: export into a new folder so no older crop mixes in"
            )
        per_folder = dict.fromkeys((*self._classes, NOT_A_PARTICLE), 0)
        if not labelled_only:
            per_folder[UNLABELLED] = 0
        for name in per_folder:
            (folder / name).mkdir(parents=True, exist_ok=True)
        fields = [
            "id", "file", "label", "labelled_by", "labelled_at", "probe", "frame_key", "ts",
            "batch", "bbox", "model", "guess", "confidence", "status", "decision_reason",
            "kept_because", "kept_at",
        ]  # fmt: skip
        with (folder / LABELS_CSV).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            after = 0
            while True:
                page = self.list_samples(
                    labelled=True if labelled_only else None, after_id=after, limit=500
                )
                if not page:
                    break
                after = page[-1].id
                for sample in page:
                    source = self._image_file(sample.id)
                    if not source.is_file():
                        log.warning("sample_image_missing", sample_id=sample.id)
                        continue
                    sub = sample.label if sample.label is not None else UNLABELLED
                    per_folder[sub] = per_folder.get(sub, 0) + 1
                    (folder / sub).mkdir(exist_ok=True)  # a label of an older class list
                    name = f"sample-{sample.id:08d}.png"
                    (folder / sub / name).write_bytes(source.read_bytes())
                    writer.writerow(
                        {
                            "id": sample.id,
                            "file": f"{sub}/{name}",
                            "label": sample.label or "",
                            "labelled_by": sample.labelled_by or "",
                            "labelled_at": _iso(sample.labelled_at),
                            "probe": sample.probe,
                            "frame_key": sample.frame_key,
                            "ts": _iso(sample.ts),
                            "batch": sample.batch or "",
                            "bbox": " ".join(str(v) for v in sample.bbox),
                            "model": sample.model,
                            "guess": sample.guess,
                            "confidence": f"{sample.confidence:.4f}",
                            "status": sample.status,
                            "decision_reason": sample.decision_reason or "",
                            "kept_because": sample.kept_because,
                            "kept_at": _iso(sample.kept_at),
                        }
                    )
        with (folder / SELECTION_CSV).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(
                handle, fieldnames=["hour", "reason", "kept", "over_cap", "dropped"]
            )
            writer.writeheader()
            for row in self.selection():
                writer.writerow(row | {"hour": _iso(row["hour"])})
        return ExportSummary(folder, per_folder)

    def import_labels(self, folder: Path, *, operator: str, at: float) -> ImportSummary:
        """Labels made elsewhere: each `sample-N.png` under a class folder (or
        `_not_a_particle/`) of an export labels crop N so, in the name of `operator`.
        Crops under `_unlabelled/` are left as they are. Every folder is checked before
        anything is written: an unknown folder name refuses the whole import."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SampleStoreError(f"{folder} is not a folder; give an export's folder")
        choices = (*self._classes, NOT_A_PARTICLE)
        unknown = sorted(
            entry.name
            for entry in folder.iterdir()
            if entry.is_dir() and entry.name not in (*choices, UNLABELLED)
        )
        if unknown:
            raise SampleStoreError(
                f"folders {', '.join(unknown)} in {folder} are no class of this model "
                f"({', '.join(choices)}, or {UNLABELLED}): rename or remove them"
            )
        planned: dict[int, str] = {}
        left = 0
        for label in (*choices, UNLABELLED):
            sub = folder / label
            if not sub.is_dir():
                continue
            for entry in sorted(sub.iterdir()):
                match = _EXPORTED_NAME.match(entry.name)
                if match is None:
                    continue
                if label == UNLABELLED:
                    left += 1
                    continue
                sample_id = int(match.group(1))
                if sample_id in planned and planned[sample_id] != label:
                    raise SampleStoreError(
                        f"sample-{sample_id:08d}.png is in both {planned[sample_id]}/ and "
                        f"{label}/: keep it in one"
                    )
                planned[sample_id] = label
        labelled = unchanged = missing = 0
        for sample_id, label in sorted(planned.items()):
            current = self.get(sample_id)
            if current is None:
                missing += 1  # evicted since the export
                continue
            if current.label == label:
                unchanged += 1
                continue
            self.set_label(sample_id, label, operator=operator, at=at)
            labelled += 1
        return ImportSummary(labelled, unchanged, missing, left)


def _iso(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else iso_utc(value)
