"""Unit tests of the pipeline stages: quality gate, sampling, micro-batcher, store, stream."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.config.settings import ParticlesConfig, QualityConfig, StreamSourceConfig, TilesConfig
from monitor.pipeline.batcher import MicroBatcher
from monitor.pipeline.frame_queue import FrameQueue
from monitor.pipeline.quality_gate import assess_frame, focus_measure
from monitor.pipeline.sampling import ParticleSampler, TileSampler
from monitor.simulator import ConstantProfile, FrameConfig, FrameSimulator
from monitor.sources.base import FrameItem
from monitor.sources.stream import StreamSource
from monitor.store import FrameRow, Store


@pytest.fixture(scope="module")
def frames() -> list[tuple[np.ndarray, list]]:  # type: ignore[type-arg]
    simulator = FrameSimulator(FrameConfig(profile=ConstantProfile(0.3)), seed=17)
    return [simulator.render(5.0 * k) for k in range(4)]


# -- quality gate ------------------------------------------------------------------


def test_gate_accepts_a_normal_frame_and_rejects_empty_and_saturated(frames) -> None:  # type: ignore[no-untyped-def]
    image = frames[0][0]
    config = QualityConfig()
    assert assess_frame(image, config).accepted
    flat = np.full_like(image, 60)
    assert assess_frame(flat, config).reason == "empty"
    glare = image.copy()
    glare[: image.shape[0] // 2] = 255
    assert assess_frame(glare, config).reason == "saturated"


@pytest.mark.parametrize("measure", ["laplacian", "tenengrad"])
def test_gate_rejects_a_blurred_frame_by_focus(frames, measure: str) -> None:  # type: ignore[no-untyped-def]
    image = frames[0][0]
    blurred = cv2.GaussianBlur(image, (0, 0), 6)
    sharp_focus = focus_measure(image, measure)
    blurred_focus = focus_measure(blurred, measure)
    assert blurred_focus < sharp_focus / 3
    config = QualityConfig(focus_measure=measure, min_focus=(sharp_focus + blurred_focus) / 2)
    assert assess_frame(image, config).accepted
    assert assess_frame(blurred, config).reason == "out_of_focus"


# -- sampling ------------------------------------------------------------------------


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_segmentation_finds_the_in_focus_particles(frames) -> None:  # type: ignore[no-untyped-def]
    sampler = ParticleSampler(ParticlesConfig())
    found = total = spurious = 0
    for image, truth in frames:
        boxes = sampler.find_particles(image)
        for particle in truth:
            if particle.in_focus:
                total += 1
                found += any(_iou(particle.bbox, box) > 0.3 for box in boxes)
        spurious += sum(all(_iou(p.bbox, box) <= 0.3 for p in truth) for box in boxes)
    assert found / total >= 0.9, (found, total)
    assert spurious <= 0.15 * total, spurious


def test_particle_crops_are_square_and_inside_the_frame(frames) -> None:  # type: ignore[no-untyped-def]
    image = frames[1][0]
    crops = ParticleSampler(ParticlesConfig()).sample(image)
    assert crops
    for crop in crops:
        height, width = crop.image.shape
        assert height == width and height >= 16


def test_tiles_cover_the_frame_on_a_grid() -> None:
    image = np.zeros((400, 600), np.uint8)
    crops = TileSampler(TilesConfig(size=200, stride=200)).sample(image)
    assert [c.bbox for c in crops] == [(x, y, 200, 200) for y in (0, 200) for x in (0, 200, 400)]


# -- micro-batcher ---------------------------------------------------------------------


class RecordingBackend:
    name = "recording"

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.fail = fail

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.fail:
            raise RuntimeError("device lost")
        self.batches.append(len(batch))
        # Probability of class 1 is the crop's mean value: checks rows come back in order.
        p = batch.mean(axis=(1, 2, 3))
        return np.stack([1 - p, p], axis=1).astype(np.float32)

    def close(self) -> None:
        pass


def _crops(values: list[float]) -> np.ndarray:
    return np.stack([np.full((3, 4, 4), v, np.float32) for v in values])


def test_batcher_packs_requests_and_returns_each_its_own_rows() -> None:
    backend = RecordingBackend()
    batcher = MicroBatcher(backend, max_batch=8, max_wait_s=0.05, queue_crops=64)
    batcher.start()
    results: dict[int, np.ndarray] = {}
    done = threading.Event()

    def collect(index: int):  # type: ignore[no-untyped-def]
        def on_done(rows: np.ndarray | None, error: str | None) -> None:
            assert error is None and rows is not None
            results[index] = rows
            if len(results) == 5:
                done.set()

        return on_done

    sizes = [3, 1, 20, 2, 5]  # 20 is split across batches and reassembled
    for index, size in enumerate(sizes):
        batcher.submit(_crops([index / 10] * size), collect(index))
    assert done.wait(5)
    batcher.stop()
    for index, size in enumerate(sizes):
        assert results[index].shape == (size, 2)
        np.testing.assert_allclose(results[index][:, 1], index / 10, atol=1e-6)
    assert max(backend.batches) <= 8 and sum(backend.batches) == sum(sizes)


def test_batcher_blocks_when_full_instead_of_growing() -> None:
    slow = RecordingBackend()
    original = slow.infer
    slow.infer = lambda batch: (time.sleep(0.2), original(batch))[1]  # type: ignore[method-assign]
    batcher = MicroBatcher(slow, max_batch=4, max_wait_s=0.0, queue_crops=8)
    batcher.start()
    started = time.monotonic()
    for _ in range(6):
        batcher.submit(_crops([0.5] * 4), lambda rows, error: None)
        assert batcher.queued_crops <= 8
    assert time.monotonic() - started >= 0.2  # the producer had to wait for the backend
    batcher.stop()


def test_batcher_reports_a_failed_batch_and_keeps_going() -> None:
    backend = RecordingBackend(fail=True)
    batcher = MicroBatcher(backend, max_batch=4, max_wait_s=0.0, queue_crops=16)
    batcher.start()
    errors: list[str | None] = []
    event = threading.Event()
    batcher.submit(_crops([0.1]), lambda rows, error: (errors.append(error), event.set()))
    assert event.wait(5)
    backend.fail = False
    rows_seen: list[np.ndarray | None] = []
    event.clear()
    batcher.submit(_crops([0.2]), lambda rows, error: (rows_seen.append(rows), event.set()))
    assert event.wait(5)
    batcher.stop()
    assert errors[0] is not None and "device lost" in errors[0]
    assert rows_seen[0] is not None and batcher.stats.failures == 1


# -- store ------------------------------------------------------------------------------


def _row(key: str, ts: float, journal: bool = True, stored_at: float | None = None) -> FrameRow:
    return FrameRow(
        "R1",
        key,
        ts,
        None,
        "ok",
        None,
        {"CEX": 1, "PG": 0},
        0,
        ts if stored_at is None else stored_at,
        journal=journal,
    )


def test_store_counts_a_journaled_file_once_and_purges_by_recording_time(tmp_path: Path) -> None:
    store = Store(tmp_path)
    added = store.record_frames([_row("a.png", 100.0), _row("b.png", 200.0)])
    assert added == [True, True]
    assert store.record_frames([_row("a.png", 100.0)]) == [False]
    # The same file twice in one group: the first is added, the second is not.
    assert store.record_frames([_row("c.png", 5.0, stored_at=300.0)] * 2) == [True, False]
    store.record_frames([_row("stream-1", 300.0, journal=False)] * 2)  # streams: no journal
    assert store.journaled_keys("R1") == {"a.png", "b.png", "c.png"}
    assert [r.key for r in store.iter_frames()] == [
        "a.png",
        "b.png",
        "c.png",
        "stream-1",
        "stream-1",
    ]
    store.record_snapshot("R1", 150.0, None, {"windows": {}})
    # a, b (rows and journal entries) and the snapshot were recorded before 250; c's name
    # says time 5.0 but it was recorded at 300 and stays.
    assert store.purge(older_than=250.0) == 5
    assert [r.key for r in store.iter_frames()] == ["c.png", "stream-1", "stream-1"]
    assert store.journaled_keys("R1") == {"c.png"}
    store.close()


def test_store_remembers_the_running_batch(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.start_batch("R1", "B-001", 10.0)
    store.start_batch("R1", "B-002", 20.0)
    assert store.current_batch("R1") == ("B-002", 20.0)
    store.stop_batch("R1", 30.0)
    assert store.current_batch("R1") is None
    store.close()


# -- stream source ------------------------------------------------------------------------


class ListSink:
    def __init__(self) -> None:
        self.items: list[FrameItem] = []

    def put(self, item: FrameItem, *, block: bool) -> bool:
        self.items.append(item)
        return True


def test_stream_source_reads_a_video_file_capped_in_rate(tmp_path: Path) -> None:
    video = tmp_path / "probe.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (320, 240))
    for index in range(40):
        frame = np.full((240, 320, 3), index * 5, np.uint8)
        writer.write(frame)
    writer.release()
    source = StreamSource(
        "S1", StreamSourceConfig(type="stream", url=str(video), max_fps=50), clock=time.time
    )
    sink = ListSink()
    started = time.monotonic()
    source.start(sink)
    deadline = time.monotonic() + 10
    while source.health() != (False, "video file ended") and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    source.stop()
    assert len(sink.items) == 40
    assert elapsed >= 40 / 50 * 0.8  # paced at the cap, not read as fast as possible
    first = sink.items[0].read()
    assert first.shape == (240, 320) and first.dtype == np.uint8


def test_stream_source_reconnects_with_backoff(tmp_path: Path) -> None:
    source = StreamSource(
        "S1",
        StreamSourceConfig(
            type="stream", url=str(tmp_path / "not-yet.avi"), reconnect_min=0.05, reconnect_max=0.2
        ),
        clock=time.time,
    )
    source.start(ListSink())
    time.sleep(1.0)
    source.stop()
    assert source.health() == (False, "reconnecting")
    assert 3 <= source.reconnects <= 12  # backoff grew: not 20 attempts in a second


def _item(key: str) -> FrameItem:
    return FrameItem("R1", key, 0.0, read=lambda: np.zeros((4, 4), np.uint8))


def test_frame_queue_put_waits_drops_the_oldest_or_refuses_as_documented() -> None:
    frames = FrameQueue(2)
    assert frames.put(_item("a"), block=True) and frames.put(_item("b"), block=True)
    started = time.monotonic()
    assert not frames.put(_item("c"), block=True)  # full: waited, then said so
    assert time.monotonic() - started >= 0.19
    assert frames.dropped == 0 and frames.qsize() == 2
    assert frames.put(_item("d"), block=False)  # a stream's frame: the oldest makes room
    assert frames.dropped == 1
    taken = [frames.get(timeout=0.1), frames.get(timeout=0.1)]
    assert [item.key for item in taken if item is not None] == ["b", "d"]
    frames.close()
    assert not frames.put(_item("e"), block=True) and not frames.put(_item("f"), block=False)
    assert frames.qsize() == 0
