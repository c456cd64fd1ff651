"""Particle sizes from the worker's measurement to the store and the windows (issue 15).

The pure parts by hand and against numpy: the weighted quantile rule, the fixed
log-spaced histogram, each window's `sizes` document. Then the real SQLite store: the
particles table written with its frame in one transaction, read back for export,
purged with its frame, gained in place by an older store, and refilled into the
windows after a restart.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monitor.aggregate import (
    SIZE_BIN_EDGES,
    FrameRecord,
    WindowAggregator,
    class_sizes,
    size_histogram,
    weighted_quantiles,
)
from monitor.config.settings import StoreConfig, load_settings
from monitor.imaging.particle_size import ParticleSize
from monitor.manifest import ModelManifest, load_manifest
from monitor.pipeline.outcome import FrameOutcome, ParticleBox
from monitor.pipeline.recorder import Recorder
from monitor.runtime.probe_state import create_probe_states, frame_record
from monitor.sources.base import FrameItem
from monitor.store import DB_FILE, FrameRow, ParticleRow, ParticleSizeRow, Store
from tests.daemon_process import wait_for

CLASSES = ("CEX", "PG")

# -- the quantile rule ---------------------------------------------------------------


def test_number_weighted_quantiles_are_numpys_hazen_quantiles() -> None:
    rng = np.random.default_rng(7)
    for size in (1, 2, 3, 10, 257):
        values = rng.lognormal(4.0, 0.6, size)
        expected = np.quantile(values, [0.1, 0.5, 0.9], method="hazen")
        assert weighted_quantiles(values, None, (0.1, 0.5, 0.9)) == pytest.approx(expected)
        # Equal weights of any size are the same rule.
        equal = weighted_quantiles(values, np.full(size, 3.5), (0.1, 0.5, 0.9))
        assert equal == pytest.approx(expected)


def test_square_weighted_quantiles_by_hand() -> None:
    """Diameters 3, 1, 2 weigh 9, 1, 4 (W = 14). Sorted, each sits at the middle of its
    weight: P = (1 - 0.5)/14, (5 - 2)/14, (14 - 4.5)/14 = 0.5/14, 3/14, 9.5/14.
    D10 = 1 + (1.4 - 0.5)/(3 - 0.5) = 1.36; D50 = 2 + (7 - 3)/(9.5 - 3) = 2.615385;
    D90 (12.6/14 > 9.5/14) is the largest, 3."""
    values = np.array([3.0, 1.0, 2.0])
    d10, d50, d90 = weighted_quantiles(values, values**2, (0.1, 0.5, 0.9))
    assert d10 == pytest.approx(1.36)
    assert d50 == pytest.approx(2.0 + 4.0 / 6.5)
    assert d90 == 3.0


def test_square_weighted_d50_lies_above_the_number_weighted_one() -> None:
    """ECD² weights favour the large particles, as a chord-length count does: for a
    lognormal number distribution (sigma s) the square-weighted median is
    exp(mu + 2 s²) (Hatch-Choate); a large sample comes within a few percent."""
    rng = np.random.default_rng(1)
    mu, sigma = math.log(50.0), 0.4
    ecd = rng.lognormal(mu, sigma, 40_000)
    sizes = class_sizes(ecd, np.full(ecd.size, 0.5))
    assert sizes.d50 == pytest.approx(50.0, rel=0.02)
    assert sizes.d50_sq == pytest.approx(math.exp(mu + 2 * sigma**2), rel=0.02)
    assert sizes.d10 is not None and sizes.d90 is not None
    assert sizes.d10 < sizes.d50 < sizes.d90


def test_no_particles_means_null_quantiles_and_empty_bins() -> None:
    sizes = class_sizes(np.array([]), np.array([]))
    assert sizes.count == 0
    assert (sizes.d10, sizes.d50, sizes.d90, sizes.d50_sq, sizes.mean_aspect_ratio) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert sizes.histogram == (0,) * (len(SIZE_BIN_EDGES) - 1)


# -- the histogram ---------------------------------------------------------------------


def test_bin_edges_are_fixed_log_spaced_four_per_decade_from_1_to_10000() -> None:
    assert len(SIZE_BIN_EDGES) == 17
    assert SIZE_BIN_EDGES[0] == 1.0 and SIZE_BIN_EDGES[-1] == pytest.approx(10_000.0)
    assert SIZE_BIN_EDGES[4] == pytest.approx(10.0) and SIZE_BIN_EDGES[8] == pytest.approx(100.0)
    ratios = np.diff(np.log10(SIZE_BIN_EDGES))
    assert ratios == pytest.approx(np.full(16, 0.25))


def test_histogram_bins_are_half_open_and_outside_values_go_to_the_end_bins() -> None:
    edges = (1.0, 10.0, 100.0, 1000.0)
    values = np.array([0.2, 1.0, 9.99, 10.0, 99.0, 100.0, 1000.0, 5e6])
    # below 1 -> first; 1 and 9.99 -> first; 10, 99 -> second; 100 -> third;
    # 1000 (the last edge, closed) and above -> last.
    assert size_histogram(values, edges) == [3, 2, 3]
    assert sum(size_histogram(values, edges)) == values.size
    expected, _ = np.histogram(np.clip(values, 1.0, 1000.0), bins=edges)
    assert size_histogram(values, edges) == expected.tolist()


# -- the windows -----------------------------------------------------------------------


def _record(ts: float, sizes: list[tuple[int, float, float]]) -> FrameRecord:
    counts = [0, 0]
    for index, _, _ in sizes:
        counts[index] += 1
    return FrameRecord(ts=ts, class_counts=tuple(counts), sizes=tuple(sizes))


def test_each_window_carries_its_own_particles_sizes_in_the_published_shape() -> None:
    agg = WindowAggregator(CLASSES, windows_s=(60, 300), size_unit="um")
    agg.add(_record(10.0, [(0, 100.0, 0.2), (1, 40.0, 0.8)]))  # only in the 300 s window
    agg.add(_record(250.0, [(0, 200.0, 0.3), (0, 300.0, 0.1)]))
    agg.add(_record(210.0, [(1, 60.0, 0.6)]))  # late: placed in time order
    document = json.loads(json.dumps(agg.snapshot(260.0).to_json()))
    short, long = document["windows"]["60"]["sizes"], document["windows"]["300"]["sizes"]
    assert set(short) == {"unit", "measure", "bin_edges", "classes"}
    assert short["unit"] == "um" and short["measure"] == "ecd"
    assert short["bin_edges"] == list(SIZE_BIN_EDGES) == long["bin_edges"]
    cex = short["classes"]["CEX"]
    assert set(cex) == {
        "count", "d10", "d50", "d90", "d10_sq", "d50_sq", "d90_sq",
        "mean_aspect_ratio", "histogram",
    }  # fmt: skip
    assert cex["count"] == 2 and cex["d50"] == pytest.approx(250.0)
    assert cex["mean_aspect_ratio"] == pytest.approx(0.2)
    assert len(cex["histogram"]) == len(SIZE_BIN_EDGES) - 1 and sum(cex["histogram"]) == 2
    assert short["classes"]["PG"]["count"] == 1 and short["classes"]["PG"]["d50"] == 60.0
    assert long["classes"]["CEX"]["count"] == 3
    assert long["classes"]["CEX"]["d50"] == pytest.approx(200.0)
    assert long["classes"]["PG"]["d50"] == pytest.approx(50.0)  # 40 and 60
    # 200 um: bin [177.8, 316.2) is the 10th (edges 10**(9/4), 10**(10/4)).
    assert long["classes"]["CEX"]["histogram"][9] == 2


def test_sizes_leave_with_their_frames_and_a_batch_start_clears_them() -> None:
    agg = WindowAggregator(CLASSES, windows_s=(60,))
    agg.add(_record(0.0, [(0, 10.0, 0.5)]))
    agg.add(_record(100.0, [(1, 20.0, 0.5)]))
    sizes = agg.snapshot(100.0).windows[60].sizes
    assert sizes.unit == "px"
    assert (sizes.classes["CEX"].count, sizes.classes["PG"].count) == (0, 1)
    assert sizes.classes["CEX"].d50 is None
    agg.start_batch("B-2", 150.0)
    assert agg.snapshot(150.0).windows[60].sizes.classes["PG"].count == 0


def test_the_particle_buffer_grows_and_keeps_every_particle_in_time_order() -> None:
    agg = WindowAggregator(CLASSES, windows_s=(1000,))
    rng = np.random.default_rng(3)
    expected = []
    for ts in rng.permutation(600).astype(float):  # 600 frames, out of order
        sizes = [(int(i % 2), float(ts + i), 0.5) for i in range(12)]
        expected += [s[1] for s in sizes if s[0] == 0]
        agg.add(_record(ts, sizes))
    cex = agg.snapshot(600.0).windows[1000].sizes.classes["CEX"]
    assert cex.count == len(expected) == 3600
    assert cex.d50 == pytest.approx(np.quantile(expected, 0.5, method="hazen"))


def test_a_record_with_sizes_of_an_unknown_class_or_on_a_rejected_frame_is_refused() -> None:
    with pytest.raises(ValueError, match="size class indices"):
        FrameRecord(ts=1.0, class_counts=(1, 0), sizes=((2, 10.0, 1.0),))
    with pytest.raises(ValueError, match="rejected frame"):
        FrameRecord(ts=1.0, class_counts=(0, 0), rejected_reason="blur", sizes=((0, 1.0, 1.0),))


def _size(ecd: float, unit: str = "um") -> ParticleSize:
    area = math.pi * ecd * ecd / 4
    return ParticleSize(area, ecd, ecd * 2, ecd / 2, 0.25, unit)  # type: ignore[arg-type]


def _item(key: str, ts: float = 1000.0) -> FrameItem:
    def read() -> np.ndarray:
        raise AssertionError("not read here")

    return FrameItem(probe="R1", key=key, ts=ts, read=read)


BOXES = (
    ParticleBox(10, 20, 30, 40, "CEX", 0.97, False, size=_size(120.0)),
    ParticleBox(50, 60, 70, 80, "PG", 0.55, True, size=_size(80.0)),  # low confidence
    ParticleBox(1, 2, 3, 4, "PG", 0.99, True, True, size=_size(5.0)),  # out of distribution
    ParticleBox(5, 6, 7, 8, "PG", 0.91, False, size=None),  # no mask
    ParticleBox(9, 9, 9, 9, "PG", 0.95, False, size=_size(60.0, "px")),  # other unit
)


def test_the_windows_size_only_confident_particles_measured_in_the_probes_unit() -> None:
    outcome = FrameOutcome(_item("a.png"), "ok", None, (1, 2), 1, n_ood=1, boxes=BOXES)
    assert frame_record(outcome, CLASSES, "um").sizes == ((0, 120.0, 0.25),)
    assert frame_record(outcome, CLASSES, "px").sizes == ((1, 60.0, 0.25),)


# -- the store -------------------------------------------------------------------------


def test_particles_are_stored_with_their_frame_read_back_and_purged_with_it(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path)
    recorded: list[str] = []
    clock = iter([500.0, 900.0]).__next__
    recorder = Recorder(
        store,
        CLASSES,
        batch_of=lambda probe: "B-1",
        on_recorded=lambda outcome: recorded.append(outcome.item.key),
        clock=clock,
    )
    recorder.start()
    recorder.submit(FrameOutcome(_item("a.png", 100.0), "ok", None, (1, 2), 1, boxes=BOXES))
    assert wait_for(lambda: recorded == ["a.png"], timeout=10)
    recorder.submit(FrameOutcome(_item("b.png", 200.0), "rejected", "out_of_focus", (0, 0), 0))
    recorder.submit(FrameOutcome(_item("c.png", 300.0), "ok", None, (1, 0), 0, boxes=BOXES[:1]))
    assert wait_for(lambda: len(recorded) == 3, timeout=10)
    recorder.stop()

    stored = list(store.iter_particles())
    assert [(p.key, p.probe, p.ts, p.batch) for p in stored] == [
        ("a.png", "R1", 100.0, "B-1")
    ] * 5 + [("c.png", "R1", 300.0, "B-1")]
    first = stored[0].particle
    assert first == ParticleRow(
        "CEX", "ok", None, 0.97, (10, 20, 30, 40), ParticleSizeRow(*_row_size(_size(120.0)))
    )
    assert [p.particle.status for p in stored[:5]] == ["ok", "uncertain", "uncertain", "ok", "ok"]
    assert [p.particle.reason for p in stored[:5]] == [
        None,
        "low_confidence",
        "out_of_distribution",
        None,
        None,
    ]
    assert stored[3].particle.size is None
    assert [p.key for p in store.iter_particles(since=250.0)] == ["c.png"]

    # Retention follows the frames' (recorded at 500 and 900): a.png's particles leave
    # with a.png.
    store.purge(older_than=600.0)
    assert [p.key for p in store.iter_particles()] == ["c.png"]
    left = sqlite3.connect(tmp_path / DB_FILE).execute("SELECT COUNT(*) FROM particles")
    assert left.fetchone() == (1,)
    store.close()


def _row_size(size: ParticleSize) -> tuple[float, float, float, float, float, str]:
    return (size.area, size.ecd, size.feret_max, size.feret_min, size.aspect_ratio, size.unit)


def test_a_frame_seen_twice_stores_its_particles_once(tmp_path: Path) -> None:
    store = Store(tmp_path)
    particle = ParticleRow("PG", "ok", None, 0.9, (0, 0, 5, 5), None)
    row = FrameRow("R1", "a.png", 1.0, None, "ok", None, {"PG": 1}, 0, 2.0, particles=(particle,))
    assert store.record_frames([row, row]) == [True, False]
    assert store.record_frames([row]) == [False]
    assert len(list(store.iter_particles())) == 1
    store.close()


def test_an_older_store_gains_the_particles_table_in_place(tmp_path: Path) -> None:
    """A store from before issue 15 (no particles table): a read-only export reads no
    particles from it; the daemon opening it adds the table, old frames have none."""
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.executescript(
        """
        CREATE TABLE frames (id INTEGER PRIMARY KEY, probe TEXT NOT NULL, key TEXT NOT NULL,
            ts REAL NOT NULL, batch TEXT, status TEXT NOT NULL, reason TEXT,
            counts TEXT NOT NULL, n_uncertain INTEGER NOT NULL, stored_at REAL NOT NULL,
            latency_s REAL, n_ood INTEGER NOT NULL DEFAULT 0, model TEXT);
        INSERT INTO frames (probe, key, ts, status, counts, n_uncertain, stored_at)
            VALUES ('R1', 'old.png', 100.0, 'ok', '{"CEX": 3}', 0, 100.5);
        """
    )
    db.commit()
    db.close()
    readonly = Store(tmp_path, readonly=True)
    assert list(readonly.iter_particles()) == []
    assert readonly.frames_since("R1", 0.0, particles=True)[0].particles == ()
    readonly.close()

    store = Store(tmp_path)
    particle = ParticleRow("CEX", "ok", None, 0.9, (1, 2, 3, 4), None)
    new = FrameRow(
        "R1", "new.png", 200.0, None, "ok", None, {"CEX": 1}, 0, 200.5, particles=(particle,)
    )
    store.record_frames([new])
    frames = store.frames_since("R1", 0.0, particles=True)
    assert [(f.key, f.particles) for f in frames] == [("old.png", ()), ("new.png", (particle,))]
    store.close()


def test_a_restart_refills_the_size_distributions_from_the_store(tmp_path: Path) -> None:
    settings = load_settings(
        data={
            "daemon": {"state_dir": str(tmp_path)},
            "aggregation": {"windows": ["60s"]},
            "probes": [{"id": "R1", "pixel_size_um": 2.0, "source": {"type": "simulated"}}],
        }
    )
    store = Store(tmp_path)
    particles = tuple(
        ParticleRow(
            "CEX" if i % 3 else "PG",
            "ok" if i < 9 else "uncertain",
            None if i < 9 else "low_confidence",
            0.9,
            (i, i, 5, 5),
            ParticleSizeRow(1.0, 10.0 * (i + 1), 1.0, 1.0, 0.5, "um" if i != 8 else "px"),
        )
        for i in range(10)
    )
    counts = {"CEX": 6, "PG": 3}
    store.record_frames(
        [FrameRow("R1", "a.png", 990.0, None, "ok", None, counts, 1, 990.5, particles=particles)]
    )
    manifest = _manifest()
    states = create_probe_states(settings, manifest, store, now=1000.0)
    sizes = states["R1"].aggregator.snapshot(1000.0).windows[60].sizes
    assert sizes.unit == "um"
    # ECD 10 * (i + 1) um. PG: i = 0, 3, 6 -> 10, 40, 70; CEX: i = 1, 2, 4, 5, 7 -> 20, 30,
    # 50, 60, 80 (i = 8 is in px: left out; i = 9 is uncertain: not counted).
    assert sizes.classes["PG"].count == 3 and sizes.classes["PG"].d50 == 40.0
    assert sizes.classes["CEX"].count == 5 and sizes.classes["CEX"].d50 == 50.0
    store.close()


def _manifest() -> ModelManifest:
    return load_manifest(verify_hash=False).manifest


def _export(state: Path, *options: str) -> str:
    command = [sys.executable, "-m", "monitor", "export", "--state-dir", str(state)]
    result = subprocess.run(
        [*command, "--what", "particles", *options],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_export_particles_streams_csv_and_json_lines_with_sizes_rounded_and_empty_without(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path)
    sized = ParticleRow(
        "PG", "ok", None, 0.987654321, (10, 20, 30, 40), ParticleSizeRow(*_row_size(_size(80.0)))
    )
    tile = ParticleRow("CEX", "uncertain", "low_confidence", 0.51, (0, 0, 224, 224), None)
    frames = [
        FrameRow("R1", "a.png", 1e9, "B-7", "ok", None, {"PG": 1}, 1, 1e9, particles=(sized, tile)),
        FrameRow("R1", "b.png", 1e9 + 9, None, "ok", None, {}, 0, 1e9 + 9),  # no particles
    ]
    store.record_frames(frames)
    store.close()

    lines = [json.loads(line) for line in _export(tmp_path, "--format", "jsonl").splitlines()]
    assert lines == [
        {
            "ts": "2001-09-09T01:46:40.000Z",
            "probe": "R1",
            "key": "a.png",
            "batch": "B-7",
            "class": "PG",
            "status": "ok",
            "reason": None,
            "confidence": 0.987654,
            "x": 10,
            "y": 20,
            "w": 30,
            "h": 40,
            "area": pytest.approx(math.pi * 1600, rel=1e-5),
            "ecd": 80.0,
            "feret_max": 160.0,
            "feret_min": 40.0,
            "aspect_ratio": 0.25,
            "unit": "um",
        },
        {
            "ts": "2001-09-09T01:46:40.000Z",
            "probe": "R1",
            "key": "a.png",
            "batch": "B-7",
            "class": "CEX",
            "status": "uncertain",
            "reason": "low_confidence",
            "confidence": 0.51,
            "x": 0,
            "y": 0,
            "w": 224,
            "h": 224,
            "area": None,
            "ecd": None,
            "feret_max": None,
            "feret_min": None,
            "aspect_ratio": None,
            "unit": None,
        },
    ]
    rows = list(csv.DictReader(io.StringIO(_export(tmp_path))))
    assert [(r["class"], r["ecd"], r["unit"]) for r in rows] == [
        ("PG", "80.0", "um"),
        ("CEX", "", ""),
    ]
    assert _export(tmp_path, "--since", "2001-09-09T01:47:00Z") == ""


def test_particle_rows_follow_their_own_shorter_retention_and_frames_stay(tmp_path: Path) -> None:
    """store.particle_retention: the bulky particle rows go first (7 days by default)
    while their frames stay the full retention; a frame's cut-off still takes its
    particles with it."""
    store = Store(tmp_path)
    recorded: list[str] = []
    recorder = Recorder(
        store,
        CLASSES,
        batch_of=lambda probe: None,
        on_recorded=lambda outcome: recorded.append(outcome.item.key),
        clock=iter([1_000.0 + 100 * i for i in range(6)]).__next__,
    )
    recorder.start()
    for index in range(6):  # recorded at 1000, 1100, ... 1500
        key = f"f{index}.png"
        recorder.submit(FrameOutcome(_item(key, 10.0 * index), "ok", None, (1, 2), 1, boxes=BOXES))
        assert wait_for(lambda key=key: recorded[-1:] == [key], timeout=10)
    recorder.stop()
    assert store.purge(older_than=0.0, particles_older_than=1_250.0) == 0  # no frame goes
    assert sorted({p.key for p in store.iter_particles()}) == ["f3.png", "f4.png", "f5.png"]
    assert len(list(store.iter_frames())) == 6
    store.purge(older_than=1_350.0, particles_older_than=1_000.0)  # the frames' cut wins
    assert sorted({p.key for p in store.iter_particles()}) == ["f4.png", "f5.png"]
    assert [row.key for row in store.iter_frames()] == ["f4.png", "f5.png"]
    store.close()
    assert StoreConfig().particle_retention == 7 * 86400.0
