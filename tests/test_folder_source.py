"""The folder source against real files written the way probe software writes them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog.testing

from monitor.config.settings import FolderSourceConfig
from monitor.imaging.decode import DecodeError
from monitor.sources.base import FrameItem
from monitor.sources.folder import FolderSource, frame_time_from_name


class ListSink:
    """Collects items and reads each at once, as a pipeline worker would."""

    def __init__(self) -> None:
        self.items: list[FrameItem] = []
        self.decoded: dict[str, np.ndarray | str] = {}
        self.lock = threading.Lock()

    def put(self, item: FrameItem, *, block: bool) -> bool:
        try:
            result: np.ndarray | str = item.read()
        except DecodeError as exc:
            result = exc.reason
        with self.lock:
            self.items.append(item)
            self.decoded[item.key] = result
        return True

    def seen_keys(self) -> list[str]:
        with self.lock:
            return [item.key for item in self.items]


def _png(seed: int, size: int = 151) -> bytes:
    image = (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def _wait_for(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _source(folder: Path, **overrides: object) -> tuple[FolderSource, ListSink, list[str]]:
    config = FolderSourceConfig.model_validate(
        {"type": "folder", "path": folder, "settle_time": 0.3, "rescan_interval": 1.0, **overrides}
    )
    skipped: list[str] = []
    source = FolderSource(
        "R1",
        config,
        journaled=lambda keys: set(),
        record_skipped=lambda keys, reason: skipped.extend(keys),
    )
    sink = ListSink()
    source.start(sink)
    return source, sink, skipped


def test_write_then_rename_is_picked_up_once(tmp_path: Path) -> None:
    source, sink, _ = _source(tmp_path)
    try:
        for index in range(20):
            temporary = tmp_path / f".frame_{index}.png.part"
            temporary.write_bytes(_png(index))
            os.replace(temporary, tmp_path / f"frame_{index:03d}.png")
        assert _wait_for(lambda: len(sink.seen_keys()) == 20)
        time.sleep(1.5)  # a rescan in between must not add anything
    finally:
        source.stop()
    assert sorted(sink.seen_keys()) == [f"frame_{i:03d}.png" for i in range(20)]
    assert all(isinstance(v, np.ndarray) for v in sink.decoded.values())


def test_slow_in_place_write_is_never_read_before_complete(tmp_path: Path) -> None:
    """A file written in 1 KB chunks every 10 ms is only read once it is whole."""
    data = _png(7, size=300)
    assert len(data) > 20_000
    source, sink, _ = _source(tmp_path)
    try:
        with (tmp_path / "slow.png").open("wb") as stream:
            for offset in range(0, len(data), 1024):
                stream.write(data[offset : offset + 1024])
                stream.flush()
                time.sleep(0.01)
                assert sink.seen_keys() == [], "read before the writer finished"
        assert _wait_for(lambda: sink.seen_keys() == ["slow.png"])
    finally:
        source.stop()
    decoded = sink.decoded["slow.png"]
    assert isinstance(decoded, np.ndarray) and decoded.shape == (300, 300)


def test_backlog_policies(tmp_path: Path) -> None:
    for index in range(5):
        path = tmp_path / f"old_{index}.png"
        path.write_bytes(_png(index))
        stamp = time.time() - 100 + index
        os.utime(path, (stamp, stamp))
    source, sink, skipped = _source(tmp_path, backlog="newest:2")
    try:
        assert _wait_for(lambda: len(sink.seen_keys()) == 2)
        time.sleep(1.2)
    finally:
        source.stop()
    assert sorted(sink.seen_keys()) == ["old_3.png", "old_4.png"]
    assert sorted(skipped) == ["old_0.png", "old_1.png", "old_2.png"]


def test_folder_vanishing_and_coming_back(tmp_path: Path) -> None:
    folder = tmp_path / "share"
    folder.mkdir()
    source, sink, _ = _source(folder)
    try:
        (folder / "a.png").write_bytes(_png(1))
        assert _wait_for(lambda: sink.seen_keys() == ["a.png"])
        (folder / "a.png").unlink()
        folder.rmdir()
        assert _wait_for(lambda: not source.health()[0], timeout=5)
        folder.mkdir()
        (folder / "b.png").write_bytes(_png(2))
        assert _wait_for(lambda: "b.png" in sink.seen_keys(), timeout=10)
        assert source.health()[0]
    finally:
        source.stop()


def test_journaled_files_are_not_handed_on_again(tmp_path: Path) -> None:
    (tmp_path / "done.png").write_bytes(_png(1))
    (tmp_path / "new.png").write_bytes(_png(2))
    config = FolderSourceConfig.model_validate({"type": "folder", "path": tmp_path})
    source = FolderSource(
        "R1",
        config,
        journaled=lambda keys: {"done.png"} & set(keys),
        record_skipped=lambda k, r: None,
    )
    sink = ListSink()
    source.start(sink)
    try:
        assert _wait_for(lambda: sink.seen_keys() == ["new.png"])
        time.sleep(0.5)
    finally:
        source.stop()
    assert sink.seen_keys() == ["new.png"]


def test_bad_files_are_handed_on_with_their_reason(tmp_path: Path) -> None:
    source, sink, _ = _source(tmp_path)
    try:
        (tmp_path / "zero.png").write_bytes(b"")
        (tmp_path / "text.png").write_text("not an image")
        (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
        assert _wait_for(lambda: len(sink.seen_keys()) == 3)
    finally:
        source.stop()
    assert sink.decoded == {
        "zero.png": "empty_file",
        "text.png": "not_an_image",
        "loop.png": "unreadable",
    }


@pytest.mark.parametrize(
    ("name", "iso"),
    [
        ("frame_20261122T013300.250Z_000123.png", "2026-11-22T01:33:00.250000+00:00"),
        ("R1_2026-11-22_01-33-00.bmp", "2026-11-22T01:33:00+00:00"),
        ("image0001.png", None),
    ],
)
def test_frame_time_from_name(name: str, iso: str | None) -> None:
    from datetime import UTC, datetime

    ts = frame_time_from_name(name)
    if iso is None:
        assert ts is None
    else:
        assert ts == pytest.approx(datetime.fromisoformat(iso).astimezone(UTC).timestamp())


def test_after_store_moves_the_file_to_the_done_folder(tmp_path: Path) -> None:
    incoming, done = tmp_path / "in", tmp_path / "done"
    incoming.mkdir()
    source, sink, _ = _source(incoming, after="move", done_dir=done)
    try:
        (incoming / "a.png").write_bytes(_png(3))
        assert _wait_for(lambda: sink.seen_keys() == ["a.png"])
    finally:
        source.stop()
    item = sink.items[0]
    assert item.after_store is not None
    item.after_store()
    assert not (incoming / "a.png").exists() and (done / "a.png").is_file()


def test_files_stay_in_place_by_default(tmp_path: Path) -> None:
    source, sink, _ = _source(tmp_path)
    try:
        (tmp_path / "a.png").write_bytes(_png(3))
        assert _wait_for(lambda: sink.seen_keys() == ["a.png"])
    finally:
        source.stop()
    assert sink.items[0].after_store is None and (tmp_path / "a.png").is_file()


# -- frame times: the name's, the mtime's or the arrival's (frame_time) --------------------


def _stamp(ts: float) -> str:
    """A file-name time as vendor software writes it (20261122T013300.250Z)."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"


def test_a_frame_named_a_year_ago_is_given_its_arrival_time_and_logged_once(
    tmp_path: Path,
) -> None:
    """Before: archived frames dropped into a live folder kept their old names' times, so
    the probe's newest frame was a year old (stale, BAD) while every frame was classified."""
    year_ago = time.time() - 365 * 86400
    old_names = [f"frame_{_stamp(year_ago + i)}_{i:03d}.png" for i in range(5)]
    current = f"frame_{_stamp(time.time())}_999.png"
    with structlog.testing.capture_logs() as logs:
        before = time.time()
        source, sink, _ = _source(tmp_path)
        try:
            for index, name in enumerate([*old_names, current]):
                (tmp_path / name).write_bytes(_png(index))
            assert _wait_for(lambda: len(sink.seen_keys()) == 6)
            after = time.time()
        finally:
            source.stop()
    times = {item.key: item.ts for item in sink.items}
    for name in old_names:
        assert before <= times[name] <= after, (name, times[name])
    assert times[current] == pytest.approx(frame_time_from_name(current))
    assert source.retimed == {"too_old": 5, "in_future": 0}
    retimed = [e for e in logs if e["event"] == "probe_file_time_too_old"]
    assert len(retimed) == 1, retimed
    assert retimed[0]["example"] in old_names
    assert retimed[0]["offset_s"] < -364 * 86400
    assert "archived frame" in retimed[0]["action"] and "s before the file" in retimed[0]["reason"]


def test_a_frame_named_in_the_future_is_given_its_arrival_time_and_logged_once(
    tmp_path: Path,
) -> None:
    ahead = time.time() + 3600
    with structlog.testing.capture_logs() as logs:
        source, sink, _ = _source(tmp_path)
        try:
            for index in range(3):
                (tmp_path / f"f_{_stamp(ahead + index)}.png").write_bytes(_png(index))
            assert _wait_for(lambda: len(sink.seen_keys()) == 3)
        finally:
            source.stop()
    assert all(item.ts <= time.time() for item in sink.items)
    future = [e for e in logs if e["event"] == "probe_file_time_in_future"]
    assert len(future) == 1 and "clock" in future[0]["action"], future


@pytest.mark.parametrize("policy", ["name", "mtime", "arrival"])
def test_frame_time_policy_picks_the_name_the_mtime_or_the_arrival(
    tmp_path: Path, policy: str
) -> None:
    """Within the tolerance each policy takes its own time: a name 30 s old, an mtime 60 s
    old, the arrival now."""
    named = time.time() - 30
    name = f"frame_{_stamp(named)}.png"
    path = tmp_path / name
    path.write_bytes(_png(1))
    modified = time.time() - 60
    os.utime(path, (modified, modified))
    before = time.time()
    source, sink, _ = _source(tmp_path, frame_time=policy)
    try:
        assert _wait_for(lambda: len(sink.seen_keys()) == 1)
    finally:
        source.stop()
    ts = sink.items[0].ts
    if policy == "name":
        assert ts == pytest.approx(frame_time_from_name(name))
    elif policy == "mtime":
        assert ts == pytest.approx(modified)
    else:
        assert before <= ts <= time.time()
    assert source.retimed == {"too_old": 0, "in_future": 0}


def test_a_longer_tolerance_keeps_the_time_of_a_frame_delivered_late(tmp_path: Path) -> None:
    """A share back after a ten-minute outage: its frames keep their names' times."""
    late = time.time() - 600
    name = f"frame_{_stamp(late)}.png"
    (tmp_path / name).write_bytes(_png(1))
    source, sink, _ = _source(tmp_path, frame_time_tolerance="15m")
    try:
        assert _wait_for(lambda: len(sink.seen_keys()) == 1)
    finally:
        source.stop()
    assert sink.items[0].ts == pytest.approx(frame_time_from_name(name))


def test_a_retried_read_keeps_the_frame_time_of_its_first_try(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png(1))
    config = FolderSourceConfig.model_validate(
        {"type": "folder", "path": tmp_path, "frame_time": "arrival"}
    )
    source = FolderSource(
        "R1",
        config,
        journaled=lambda keys: set(),
        record_skipped=lambda keys, reason: None,
        read_retry_first_s=0.3,
    )
    sink = ListSink()
    source.start(sink)
    try:
        assert _wait_for(lambda: len(sink.items) == 1)
        first = sink.items[0]
        assert first.retry is not None and first.retry("EIO: passing")
        assert _wait_for(lambda: len(sink.items) == 2)
    finally:
        source.stop()
    again = sink.items[1]
    assert again.attempt == 2 and again.ts == first.ts
