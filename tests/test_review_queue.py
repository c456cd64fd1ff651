"""The review queue: which crops are kept and why (pure), the bounded sample store over a
real SQLite file (filters, eviction unlabelled first, labels), the queue between the
pipeline and the store (drops counted, never blocking), and the real daemon filling it
while `crystal-monitor samples export` and `samples import` work on it."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.config.review import PerHourCaps, ReviewConfig
from monitor.inference.decision import Decision
from monitor.manifest import ModelIdentity
from monitor.pipeline.outcome import ClassifiedCrop, ClassifiedFrame
from monitor.review.queue import ReviewQueue
from monitor.review.sample_store import NewSample, SampleStore, SampleStoreError
from monitor.review.selection import HourlyCaps, reason_to_keep
from monitor.simulator import CropSimulator
from monitor.sources.base import FrameItem
from tests.daemon_process import DaemonProcess, export, wait_for, write_like_probe

CLASSES = ("CEX", "PG")
MODEL = ModelIdentity("cex-pg", "2.0", "0123456789abcdef" * 4)
CONFIG = ReviewConfig(boundary_margin=0.2, random_share=0.5)


def _decision(label: str, confidence: float, status: str = "ok", reason: str | None = None):
    return Decision(label, confidence, status, reason)  # type: ignore[arg-type]


# -- selection (pure) ---------------------------------------------------------------------


def test_each_crop_is_kept_for_the_first_reason_that_applies() -> None:
    ood = _decision("CEX", 0.97, "uncertain", "out_of_distribution")
    assert reason_to_keep(ood, [0.97, 0.03], CONFIG, draw=0.9) == "out_of_distribution"
    unsure = _decision("PG", 0.55, "uncertain", "low_confidence")
    assert reason_to_keep(unsure, [0.45, 0.55], CONFIG, draw=0.0) == "uncertain"
    near = _decision("CEX", 0.59)
    assert reason_to_keep(near, [0.59, 0.41], CONFIG, draw=0.0) == "boundary"
    clear = _decision("CEX", 0.95)
    assert reason_to_keep(clear, [0.95, 0.05], CONFIG, draw=0.49) == "random"
    assert reason_to_keep(clear, [0.95, 0.05], CONFIG, draw=0.5) is None


def test_caps_per_hour_and_the_random_share_per_called_class() -> None:
    config = ReviewConfig(per_hour=PerHourCaps(uncertain=3, random=4))
    caps = HourlyCaps(config, CLASSES)
    hour = 7200.0
    assert [caps.admit("uncertain", "CEX", hour + i) for i in range(5)] == [True] * 3 + [False] * 2
    # random: 4 an hour split over 2 classes, so a flood of CEX cannot crowd out PG
    assert sum(caps.admit("random", "CEX", hour + 10 + i) for i in range(10)) == 2
    assert sum(caps.admit("random", "PG", hour + 30 + i) for i in range(10)) == 2
    assert caps.admit("uncertain", "PG", hour + 3600) is True  # a new hour, a new cap
    caps.dropped("uncertain", hour + 3600)
    tallies = caps.take_tallies()
    assert (tallies[(hour, "uncertain")].kept, tallies[(hour, "uncertain")].over_cap) == (3, 2)
    assert (tallies[(hour, "random")].kept, tallies[(hour, "random")].over_cap) == (4, 16)
    late = tallies[(hour + 3600, "uncertain")]
    assert (late.kept, late.dropped) == (0, 1)
    assert caps.take_tallies() == {}


# -- the sample store (a real SQLite file) ------------------------------------------------


def _new(i: int, *, probe: str = "R1", reason: str = "uncertain", ts: float = 1000.0):
    return NewSample(
        probe=probe,
        frame_key=f"frame_{i:04d}.png",
        ts=ts + i,
        batch="B1",
        bbox=(i, 2, 30, 31),
        model=MODEL.label,
        guess="PG" if i % 2 else "CEX",
        confidence=0.6,
        probabilities={"CEX": 0.4, "PG": 0.6} if i % 2 else {"CEX": 0.6, "PG": 0.4},
        status="uncertain",
        decision_reason="low_confidence",
        ood_score=None,
        kept_because=reason,
        kept_at=5000.0 + i,
    )


def _crop(i: int) -> np.ndarray:
    return np.full((20 + i, 18), 10 + i, np.uint8)


def test_store_keeps_crops_with_their_context_and_filters_them(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "samples", CLASSES, max_samples=100)
    for i in range(6):
        store.add(
            _new(i, probe="R1" if i < 4 else "R2", reason=("uncertain", "boundary")[i % 2]),
            _crop(i),
        )
    first = store.get(1)
    assert first is not None
    assert (first.probe, first.frame_key, first.ts, first.batch) == (
        "R1",
        "frame_0000.png",
        1000.0,
        "B1",
    )
    assert first.bbox == (0, 2, 30, 31)
    assert (first.model, first.guess, first.kept_because) == (MODEL.label, "CEX", "uncertain")
    assert first.probabilities == {"CEX": 0.6, "PG": 0.4}
    path = store.image_path(1)
    assert path is not None
    assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), _crop(0))
    assert [s.id for s in store.list_samples(probe="R2")] == [5, 6]
    assert [s.id for s in store.list_samples(kept_because="boundary")] == [2, 4, 6]
    assert [s.id for s in store.list_samples(since=1002.0, until=1003.0)] == [3, 4]
    assert [s.id for s in store.list_samples(after_id=4, limit=1)] == [5]
    assert store.queue_counts() == {"uncertain": 3, "boundary": 3}

    labelled = store.set_label(2, "PG", operator="Ana", at=7000.0)
    assert (labelled.label, labelled.labelled_by, labelled.labelled_at) == ("PG", "Ana", 7000.0)
    store.set_label(3, "_not_a_particle", operator="Ana", at=7001.0)
    with pytest.raises(ValueError, match="label must be one of CEX, PG, _not_a_particle"):
        store.set_label(4, "bubble", operator="Ana", at=7002.0)
    with pytest.raises(KeyError):
        store.set_label(99, "PG", operator="Ana", at=7002.0)
    assert store.label_counts() == {"CEX": 0, "PG": 1, "_not_a_particle": 1}
    assert [s.id for s in store.list_samples(labelled=True)] == [2, 3]
    assert store.clear_label(2).label is None
    assert store.label_counts()["PG"] == 0
    store.close()

    reopened = SampleStore(tmp_path / "samples", None, create=False)  # as the CLI opens it
    assert reopened.classes == CLASSES
    assert reopened.count() == 6
    reopened.close()
    with pytest.raises(SampleStoreError, match="no review samples at"):
        SampleStore(tmp_path / "elsewhere", None, create=False)


def test_a_full_store_evicts_the_oldest_unlabelled_crop_before_any_label(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "samples", CLASSES, max_samples=10)
    for i in range(10):
        store.add(_new(i), _crop(i))
    for sample_id in (1, 2, 3):
        store.set_label(sample_id, "CEX", operator="Ana", at=1.0)
    for i in range(10, 14):
        store.add(_new(i), _crop(i))
    kept = [s.id for s in store.list_samples(limit=100)]
    assert len(kept) == 10
    assert kept == [1, 2, 3, 8, 9, 10, 11, 12, 13, 14]  # 4..7 went: unlabelled, oldest
    assert sorted(p.name for p in store.images.iterdir()) == [f"{i:08d}.png" for i in kept]
    store.close()


def test_export_writes_an_image_folder_with_labels_and_import_takes_labels_back(
    tmp_path: Path,
) -> None:
    store = SampleStore(tmp_path / "samples", CLASSES, max_samples=100)
    for i in range(6):
        store.add(_new(i), _crop(i))
    store.set_label(1, "CEX", operator="Ana", at=1_800_000_000.0)
    store.set_label(2, "PG", operator="Ben", at=1_800_000_060.0)
    store.set_label(3, "_not_a_particle", operator="Ana", at=1_800_000_120.0)
    store.add_tallies({})

    out = tmp_path / "export"
    summary = store.export(out)
    assert summary.per_folder == {"CEX": 1, "PG": 1, "_not_a_particle": 1, "_unlabelled": 3}
    assert sorted(p.name for p in (out / "PG").iterdir()) == ["sample-00000002.png"]
    assert np.array_equal(
        cv2.imread(str(out / "PG" / "sample-00000002.png"), cv2.IMREAD_GRAYSCALE), _crop(1)
    )
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert rows[1]["label"] == "PG" and rows[1]["labelled_by"] == "Ben"
    assert rows[1]["labelled_at"] == "2027-01-15T08:01:00.000Z"
    assert rows[1]["file"] == "PG/sample-00000002.png"
    assert rows[4]["label"] == "" and rows[4]["file"] == "_unlabelled/sample-00000005.png"
    with pytest.raises(SampleStoreError, match="is not empty"):
        store.export(out)
    only = store.export(tmp_path / "labelled", labelled_only=True)
    assert only.per_folder == {"CEX": 1, "PG": 1, "_not_a_particle": 1}
    assert not (tmp_path / "labelled" / "_unlabelled").exists()

    # A labeller elsewhere sorts two unlabelled crops and moves one the store had as CEX.
    (out / "_unlabelled" / "sample-00000004.png").rename(out / "PG" / "sample-00000004.png")
    (out / "_unlabelled" / "sample-00000005.png").rename(out / "CEX" / "sample-00000005.png")
    (out / "CEX" / "sample-00000001.png").rename(out / "PG" / "sample-00000001.png")
    result = store.import_labels(out, operator="Cleo", at=1_800_001_000.0)
    assert (result.labelled, result.unchanged, result.not_in_store, result.left_unlabelled) == (
        3, 2, 0, 1,
    )  # fmt: skip
    assert [(s.id, s.label, s.labelled_by) for s in store.list_samples(labelled=True)] == [
        (1, "PG", "Cleo"), (2, "PG", "Ben"), (3, "_not_a_particle", "Ana"),
        (4, "PG", "Cleo"), (5, "CEX", "Cleo"),
    ]  # fmt: skip

    (out / "bubble").mkdir()
    with pytest.raises(SampleStoreError, match=r"folders bubble in .* are no class of this model"):
        store.import_labels(out, operator="Cleo", at=1.0)
    store.close()


# -- the queue between the workers and the store ----------------------------------------


def _frame(key: str, ts: float, crops: list[tuple[str, float, str]]) -> ClassifiedFrame:
    """`crops`: (label, confidence, status) each."""
    items = []
    for index, (label, confidence, status) in enumerate(crops):
        other = 1.0 - confidence
        row = np.array([confidence, other] if label == "CEX" else [other, confidence], np.float32)
        reason = "low_confidence" if status == "uncertain" else None
        items.append(
            ClassifiedCrop(
                np.full((24, 24), index * 20, np.uint8),
                (index * 30, 0, 24, 24),
                row,
                _decision(label, confidence, status, reason),
            )
        )

    def unreadable() -> np.ndarray:
        raise AssertionError("the queue never reads the frame again")

    return ClassifiedFrame(FrameItem("R1", key, ts, unreadable), tuple(items), CLASSES, MODEL, "B9")


def test_queue_writes_what_it_keeps_and_counts_what_it_cannot(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "samples", CLASSES, max_samples=100)
    config = ReviewConfig(random_share=0.0, queue_size=4, per_hour=PerHourCaps(uncertain=100))
    queue = ReviewQueue(config, store, clock=lambda: 1234.5)
    # Not started: nothing drains the queue, so the fifth and later crops are dropped.
    frame = _frame("f1.png", 3600.0, [("PG", 0.52, "uncertain")] * 6 + [("CEX", 0.99, "ok")])
    started = time.monotonic()
    queue.observe(frame)
    assert time.monotonic() - started < 1.0  # never waits on the writer
    assert (queue.kept, queue.dropped) == (4, 2)
    queue.start()
    assert queue.wait_written(4, timeout=10)
    queue.observe(_frame("f2.png", 3700.0, [("CEX", 0.55, "ok"), ("CEX", 0.95, "ok")]))
    assert queue.wait_written(5, timeout=10)
    queue.stop(timeout=5)
    samples = store.list_samples()
    assert [(s.frame_key, s.kept_because) for s in samples] == [("f1.png", "uncertain")] * 4 + [
        ("f2.png", "boundary")
    ]
    assert samples[0].batch == "B9" and samples[0].model == MODEL.label
    assert samples[0].kept_at == 1234.5
    assert samples[-1].probabilities == pytest.approx({"CEX": 0.55, "PG": 0.45})
    assert store.selection() == [
        {"hour": 3600.0, "reason": "boundary", "kept": 1, "over_cap": 0, "dropped": 0},
        {"hour": 3600.0, "reason": "uncertain", "kept": 4, "over_cap": 0, "dropped": 2},
    ]
    store.close()


# -- the real daemon and the CLI ---------------------------------------------------------


def _config(path: Path, state: Path, folder: Path) -> Path:
    path.write_text(
        f"""
[daemon]
state_dir = "{state}"
log_format = "json"
shutdown_grace = "5s"

[review]
random_share = 1.0
boundary_margin = 0.3
[review.per_hour]
random = 6

[[probes]]
id = "R1"
sampling = "whole"
[probes.source]
type = "folder"
path = "{folder}"
settle_time = "200ms"
rescan_interval = "2s"
"""
    )
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_daemon_fills_the_queue_and_the_cli_exports_and_imports_it(tmp_path: Path) -> None:
    folder, state = tmp_path / "probe", tmp_path / "state"
    folder.mkdir()
    config = _config(tmp_path / "config.toml", state, folder)
    simulator = CropSimulator(seed=11)
    names = []
    for index in range(40):
        name = f"crop_{index:04d}.png"
        write_like_probe(folder, name, simulator.render(CLASSES[index % 2]))
        names.append(name)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        assert wait_for(lambda: len(export(config)) == 40, timeout=120), daemon.log_text()
        assert daemon.terminate() == 0
    frames = {row["key"]: row for row in export(config)}
    assert sorted(frames) == names  # the review never costs a frame

    store = SampleStore(state / "samples", None, create=False)
    samples = store.list_samples(limit=1000)
    by_reason: dict[str, int] = {}
    for sample in samples:
        by_reason[sample.kept_because] = by_reason.get(sample.kept_because, 0) + 1
        assert sample.frame_key in frames and sample.probe == "R1"
        assert sample.model.startswith("cex-pg-lite0-96:2.0:")
        assert frames[sample.frame_key]["model_sha256"].startswith(sample.model.rsplit(":")[-1])
    assert by_reason.get("random", 0) <= 6  # 3 per called class this hour, at most
    # every crop the model was unsure of is kept (40 are far below the caps)
    unsure = sum(int(row["n_uncertain"]) + int(row["n_ood"]) for row in frames.values())
    assert by_reason.get("uncertain", 0) + by_reason.get("out_of_distribution", 0) == unsure
    assert by_reason.get("random", 0) >= 1
    kept = sum(row["kept"] for row in store.selection())
    assert kept == len(samples)
    store.close()

    out = tmp_path / "export"
    done = _cli("samples", "export", str(out), "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f"exported {len(samples)} crops to {out}" in done.stdout
    unlabelled = sorted((out / "_unlabelled").iterdir())
    assert len(unlabelled) == len(samples)
    first = unlabelled[0]
    first.rename(out / "PG" / first.name)
    done = _cli("samples", "import", str(out), "--state-dir", str(state), "--operator", "Dana")
    assert done.returncode == 0, done.stderr
    assert "labelled 1 crops as Dana" in done.stdout
    store = SampleStore(state / "samples", None, create=False)
    (labelled,) = store.list_samples(labelled=True)
    assert (labelled.label, labelled.labelled_by) == ("PG", "Dana")
    assert f"sample-{labelled.id:08d}.png" == first.name
    store.close()

    refused = _cli("samples", "export", str(tmp_path / "x"), "--state-dir", str(tmp_path / "no"))
    assert refused.returncode == 66
    assert "no review samples at" in refused.stderr
