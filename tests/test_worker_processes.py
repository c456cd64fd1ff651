"""The frames' own work in worker processes: the same result as on a thread, pixels in
shared memory, and a worker that dies replaced without losing a frame."""

from __future__ import annotations

import errno
import functools
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench.memory_soak import process_tree
from monitor.config.settings import ProbeConfig, load_settings
from monitor.config.startup_error import StartupError
from monitor.daemon import Daemon
from monitor.imaging.decode import DEFAULT_LIMITS
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
from monitor.manifest import InputSpec, load_manifest
from monitor.pipeline import process_pool
from monitor.pipeline.active_model import ActiveModel
from monitor.pipeline.batcher import MicroBatcher
from monitor.pipeline.frame_queue import FrameQueue
from monitor.pipeline.frame_work import FrameReadError, prepare_frame, probe_stages, read_frame
from monitor.pipeline.outcome import FrameOutcome
from monitor.pipeline.process_pool import FramePreparers, FrameRequest, WorkerLostError
from monitor.pipeline.workers import Pipeline
from monitor.simulator import ConstantProfile, CropSimulator, FrameConfig, FrameSimulator
from monitor.sources.base import FrameItem
from monitor.sources.folder import read_frame_file
from monitor.store import Store
from tests.daemon_process import (
    DaemonProcess,
    export,
    wait_for,
    write_config,
    write_like_probe,
)

SPEC = InputSpec(size=96, resize="letterbox", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _probe(probe_id: str, sampling: str, **extra: object) -> ProbeConfig:
    return ProbeConfig.model_validate(
        {"id": probe_id, "sampling": sampling, "source": {"type": "simulated"}, **extra}
    )


PROBES = [_probe("F", "particles", pixel_size_um=0.8), _probe("C", "whole")]


@pytest.fixture(scope="module")
def pool():  # type: ignore[no-untyped-def]
    preparers = FramePreparers(2, PROBES, slot_bytes=8 << 20)
    preparers.start()
    yield preparers
    preparers.stop()


@pytest.fixture(scope="module")
def frame_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    simulator = FrameSimulator(FrameConfig(profile=ConstantProfile(0.3)), seed=21)
    image, _ = simulator.render(0.0)
    path = tmp_path_factory.mktemp("frames") / "frame_0001.png"
    assert cv2.imwrite(str(path), image)
    return path, image


def _read(path: Path) -> functools.partial[np.ndarray]:
    return functools.partial(read_frame_file, str(path), DEFAULT_LIMITS)


def test_a_worker_process_prepares_a_frame_exactly_as_a_thread_does(pool, frame_file) -> None:  # type: ignore[no-untyped-def]
    path, image = frame_file
    here = prepare_frame(image, probe_stages(PROBES)["F"], SPEC, with_crop_images=True)
    assert here.status == "ok" and len(here.boxes) >= 10
    handle = pool.prepare("F", _read(path), None, SPEC, with_crop_images=True)
    try:
        there = handle.frame
        assert there.status == "ok"
        assert there.boxes == here.boxes
        assert there.sizes == here.sizes
        assert there.sizes[0] is not None and there.sizes[0].unit == "um"
        assert there.tensors is not None and here.tensors is not None
        np.testing.assert_array_equal(there.tensors, here.tensors)
        np.testing.assert_array_equal(there.grey, image)
        assert there.crop_images is not None and here.crop_images is not None
        for a, b in zip(there.crop_images, here.crop_images, strict=True):
            np.testing.assert_array_equal(a, b)
        # The tensors are a view of the worker's shared memory, not a pickled copy.
        assert not there.tensors.flags.owndata
        base = there.tensors
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap), base
    finally:
        handle.release()
    assert pool.stats.oversize == 0


def test_pixels_read_by_the_daemon_go_to_the_worker_through_shared_memory(pool) -> None:  # type: ignore[no-untyped-def]
    crop = CropSimulator(seed=4).render("PG")
    here = prepare_frame(crop, probe_stages(PROBES)["C"], SPEC, with_crop_images=False)
    handle = pool.prepare("C", None, crop, SPEC, with_crop_images=False)
    try:
        assert handle.frame.boxes == ((0, 0, crop.shape[1], crop.shape[0]),)
        assert handle.frame.sizes == here.sizes
        assert handle.frame.crop_images is None
        np.testing.assert_array_equal(handle.frame.tensors, here.tensors)
    finally:
        handle.release()


def test_an_unreadable_file_is_reported_with_its_reason(pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for path in (broken, tmp_path / "gone.png"):
        with pytest.raises(FrameReadError) as here:
            read_frame(_read(path))
        with pytest.raises(FrameReadError) as there:
            pool.prepare("C", _read(path), None, SPEC, with_crop_images=False)
        assert (there.value.reason, there.value.detail) == (here.value.reason, here.value.detail)
        assert there.value.transient is False
    assert there.value.reason == "unreadable" and "No such file" in there.value.detail


def test_a_group_of_frames_goes_in_one_message_each_with_its_own_result(  # type: ignore[no-untyped-def]
    pool, frame_file, tmp_path: Path
) -> None:
    """Crop files, pixels read by the daemon, an unreadable file and a whole frame in
    one group: each gets the result it gets alone, in the order asked, and small
    frames let the next groups grow."""
    path, image = frame_file
    crops = [CropSimulator(seed=9).render(label) for label in ("CEX", "PG", "CEX")]
    paths = []
    for index, crop in enumerate(crops[:2]):
        paths.append(tmp_path / f"crop_{index}.png")
        assert cv2.imwrite(str(paths[-1]), crop)
    requests = [
        FrameRequest("C", _read(paths[0])),
        FrameRequest("C", _read(tmp_path / "gone.png")),
        FrameRequest("C", None, crops[2]),
        FrameRequest("F", _read(path)),
        FrameRequest("C", _read(paths[1])),
    ]
    group = pool.prepare_group(requests, SPEC, with_crop_images=False)
    try:
        stages = probe_stages(PROBES)
        expected = [crops[0], None, crops[2], image, crops[1]]
        assert len(group.results) == len(requests)
        for result, request, pixels in zip(group.results, requests, expected, strict=True):
            if pixels is None:
                assert isinstance(result, FrameReadError) and result.reason == "unreadable"
                continue
            here = prepare_frame(pixels, stages[request.probe], SPEC, with_crop_images=False)
            assert not isinstance(result, Exception)
            assert (result.status, result.boxes, result.sizes) == (
                here.status, here.boxes, here.sizes,
            )  # fmt: skip
            np.testing.assert_array_equal(result.tensors, here.tensors)
    finally:
        group.release()
    for crop_path in paths * 16:  # small frames only: a group may now hold several
        pool.prepare("C", _read(crop_path), None, SPEC, with_crop_images=False).release()
    assert pool.group_limit() == process_pool.MAX_GROUP


def _kill_own_process() -> np.ndarray:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("a SIGKILLed process runs no further")


def test_a_frame_that_kills_its_worker_takes_only_itself_down_not_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight crop files queued together, one of which kills the worker that reads it:
    the group is tried again frame by frame, the seven others are classified once
    each, and the killer is recorded as failed ("worker_lost") after its second try."""
    monkeypatch.setattr(FramePreparers, "group_limit", lambda self: 8)
    crop = CropSimulator(seed=7).render("CEX")
    items = []
    for index in range(8):
        path = tmp_path / f"crop_{index}.png"
        assert cv2.imwrite(str(path), crop)
        read = functools.partial(_kill_own_process) if index == 3 else _read(path)
        items.append(FrameItem("C", path.name, float(index), read, portable_read=True))
    model = load_manifest(None)
    backend = OnnxRuntimeBackend(model)
    batcher = MicroBatcher(backend, max_batch=32, max_wait_s=0.01, queue_crops=256)
    frames = FrameQueue(16)
    for item in items:
        assert frames.put(item, block=False)
    outcomes: list[FrameOutcome] = []
    pipeline = Pipeline(
        ActiveModel(model, backend), PROBES, batcher, frames, outcomes.extend,
        workers=1, processes=True,
    )  # fmt: skip
    batcher.start()
    pipeline.start()
    try:
        assert wait_for(lambda: len(outcomes) >= 8, timeout=60, interval=0.1), outcomes
    finally:
        assert pipeline.stop(timeout=10.0)
        batcher.stop()
        backend.close()
    by_key = {outcome.item.key: outcome for outcome in outcomes}
    assert len(outcomes) == 8 and len(by_key) == 8
    killer = by_key.pop("crop_3.png")
    assert killer.status == "error" and killer.reason is not None
    assert killer.reason.startswith("worker_lost") and "(2 tries)" in killer.reason
    assert {(o.status, sum(o.class_counts) + o.n_uncertain) for o in by_key.values()} == {("ok", 1)}
    assert pipeline.pool is not None and pipeline.pool.stats.restarts >= 2


def test_a_frame_too_big_for_a_slot_is_still_prepared_and_counted(frame_file) -> None:  # type: ignore[no-untyped-def]
    path, image = frame_file
    small = FramePreparers(1, PROBES, slot_bytes=1 << 20)  # the frame alone is 1.4 MB
    small.start()
    try:
        handle = small.prepare("F", _read(path), None, SPEC, with_crop_images=False)
        here = prepare_frame(image, probe_stages(PROBES)["F"], SPEC, with_crop_images=False)
        np.testing.assert_array_equal(handle.frame.tensors, here.tensors)
        handle.release()
        assert small.stats.oversize == 1
    finally:
        small.stop()


def test_new_thresholds_reach_the_workers(frame_file) -> None:  # type: ignore[no-untyped-def]
    path, _ = frame_file
    preparers = FramePreparers(1, PROBES)
    preparers.start()
    try:
        first = preparers.prepare("F", _read(path), None, SPEC, with_crop_images=False)
        assert first.frame.status == "ok"
        first.release()
        strict = _probe("F", "particles", quality={"min_focus": 1e9})
        preparers.update_probes([strict, PROBES[1]])
        second = preparers.prepare("F", _read(path), None, SPEC, with_crop_images=False)
        assert second.frame.status == "rejected" and second.frame.reason == "out_of_focus"
        second.release()
    finally:
        preparers.stop()


def test_a_killed_worker_fails_its_frame_and_is_replaced(tmp_path: Path) -> None:
    """SIGKILL a worker while it holds a frame: that frame raises WorkerLostError (the pipeline
    tries it once more), a new worker starts, and the next frame is prepared."""
    slow = tmp_path / "slow.png"
    crop = CropSimulator(seed=5).render("CEX")
    assert cv2.imwrite(str(slow), crop)
    preparers = FramePreparers(1, PROBES)
    preparers.start()
    try:
        [pid] = preparers.pids
        stalled = functools.partial(_sleep_then_read, 30.0, str(slow))
        import threading

        errors: list[BaseException] = []

        def prepare_stalled() -> None:
            try:
                preparers.prepare("C", stalled, None, SPEC, with_crop_images=False)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=prepare_stalled)
        thread.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], WorkerLostError), errors
        assert wait_for(lambda: preparers.stats.restarts == 1, timeout=30, interval=0.1)
        assert preparers.pids != [pid]
        handle = preparers.prepare("C", _read(slow), None, SPEC, with_crop_images=False)
        assert handle.frame.status == "ok"
        handle.release()
    finally:
        preparers.stop()


def test_a_worker_stuck_on_a_frame_is_killed_and_replaced(tmp_path: Path) -> None:
    crop_file = tmp_path / "crop.png"
    assert cv2.imwrite(str(crop_file), CropSimulator(seed=6).render("PG"))
    preparers = FramePreparers(1, PROBES)
    preparers.stuck_after_s = 1.0
    preparers.start()
    try:
        started = time.monotonic()
        stuck = functools.partial(_sleep_then_read, 120.0, str(crop_file))
        with pytest.raises(WorkerLostError):
            preparers.prepare("C", stuck, None, SPEC, with_crop_images=False)
        assert time.monotonic() - started < 60  # ended by the pool, not by the read
        assert wait_for(lambda: preparers.stats.restarts == 1, timeout=30, interval=0.1)
        handle = preparers.prepare("C", _read(crop_file), None, SPEC, with_crop_images=False)
        assert handle.frame.status == "ok"
        handle.release()
    finally:
        preparers.stop()


def _sleep_then_read(seconds: float, path: str) -> np.ndarray:
    time.sleep(seconds)
    return read_frame_file(path, DEFAULT_LIMITS)


def _worker_pids(daemon_pid: int) -> list[int]:
    """The daemon's worker processes: the children of its forkserver."""
    pids = []
    for pid in process_tree(daemon_pid)[1:]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            parent_cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"forkserver" in cmdline and b"forkserver" in parent_cmdline:
            pids.append(pid)
    return pids


@pytest.mark.slow
def test_the_daemon_loses_no_file_when_its_workers_are_killed(tmp_path: Path) -> None:
    """Files arrive while worker processes are SIGKILLed three times: every file is
    recorded once, classified, and the daemon still stops cleanly; a SIGKILL of the
    daemon itself leaves no worker and nothing in /dev/shm behind."""
    folder = tmp_path / "probe"
    folder.mkdir()
    config = write_config(tmp_path / "config.toml", tmp_path / "state", folder)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    crops = [CropSimulator(seed=8).render("PG" if i % 5 == 0 else "CEX") for i in range(20)]
    total = 600
    with daemon:
        daemon.start()
        assert daemon.process is not None
        assert wait_for(lambda: len(_worker_pids(daemon.process.pid)) >= 2, timeout=60)
        killed: set[int] = set()
        for index in range(total):
            write_like_probe(folder, f"crop_{index:05d}.png", crops[index % len(crops)])
            if index in (100, 250, 400):
                workers = _worker_pids(daemon.process.pid)
                assert workers, daemon.log_text()[-2000:]
                os.kill(workers[0], signal.SIGKILL)
                killed.add(workers[0])
            time.sleep(0.003)
        assert wait_for(lambda: len(export(config)) >= total, timeout=180, interval=1)
        rows = export(config)
        keys = sorted(row["key"] for row in rows)
        assert keys == [f"crop_{i:05d}.png" for i in range(total)], (len(keys), len(set(keys)))
        assert {row["status"] for row in rows} == {"ok"}, {row["status"] for row in rows}
        assert daemon.log_text().count('"worker_process_died"') == 3
        workers = _worker_pids(daemon.process.pid)
        assert len(workers) >= 2 and not killed & set(workers)
        daemon.kill()
        assert wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 10, 0.1)
        arenas = [
            json.loads(line)["arena"].lstrip("/")
            for line in daemon.log_text().splitlines()
            if '"worker_process_started"' in line
        ]
    assert len(arenas) == 2 + 3, arenas  # two at the start, three replacements
    assert not [name for name in arenas if (Path("/dev/shm") / name).exists()]


def test_workers_that_cannot_start_stop_start_up_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/dev/shm full: no worker can get its arena, and start-up stops naming the key."""

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(process_pool, "SharedMemory", no_space)
    with pytest.raises(StartupError) as failure:
        FramePreparers(2, PROBES).start()
    assert failure.value.key == "batcher.workers"
    assert failure.value.exit_code == 69
    assert "No space left on device" in str(failure.value)
    assert "/dev/shm" in str(failure.value)


_READ_AFTER_STOP = """
import numpy as np
from monitor.config.settings import ProbeConfig, load_settings
from monitor.manifest import InputSpec
from monitor.pipeline.process_pool import FramePreparers
from monitor.simulator import CropSimulator

if __name__ == "__main__":
    spec = InputSpec(size=96, resize="letterbox", mean=(0.5,) * 3, std=(0.25,) * 3)
    probe = ProbeConfig.model_validate(
        {"id": "C", "sampling": "whole", "source": {"type": "simulated"}}
    )
    pool = FramePreparers(1, [probe])
    pool.start()
    handle = pool.prepare(
        "C", None, CropSimulator(seed=2).render("CEX"), spec, with_crop_images=False
    )
    before = float(handle.frame.tensors.sum())
    pool.stop()  # the daemon stops the pool before the batcher has run every batch
    after = float(handle.frame.tensors.sum())
    handle.release()
    print("same" if before == after else f"changed {before} {after}")
"""


def test_tensors_stay_readable_after_the_pool_stops(tmp_path: Path) -> None:
    """A batch still queued when the pool stops reads its tensors afterwards: the arena
    must stay mapped under them (before: unmapped, and the daemon died of SIGSEGV)."""
    script = tmp_path / "read_after_stop.py"
    script.write_text(_READ_AFTER_STOP)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip().splitlines()[-1] == "same", result.stdout


def _classify_folder(root: Path, frames: list[np.ndarray], processes: bool) -> list[tuple]:  # type: ignore[type-arg]
    """Frame files through an in-process daemon; (key, status, counts, particle sizes)."""
    folder = root / "probe"
    folder.mkdir(parents=True)
    settings = load_settings(
        data={
            "daemon": {"state_dir": str(root / "state"), "log_level": "warning"},
            "batcher": {"processes": processes, "workers": 2},
            "probes": [
                {
                    "id": "R1",
                    "sampling": "particles",
                    "pixel_size_um": 0.8,
                    "source": {"type": "folder", "path": str(folder), "settle_time": "100ms"},
                }
            ],
        }
    )
    daemon = Daemon(settings)
    daemon.start()
    try:
        for index, frame in enumerate(frames):
            write_like_probe(folder, f"frame_{index:03d}.png", frame)
        assert wait_for(lambda: daemon.recorder.recorded >= len(frames), timeout=120, interval=0.1)
    finally:
        daemon.stop()
    store = Store(root / "state", readonly=True)
    try:
        return sorted(
            (
                row.key,
                row.status,
                tuple(sorted(row.counts.items())),
                tuple(
                    sorted(
                        (p.box, p.label, p.confidence, p.size and round(p.size.ecd, 6))
                        for p in row.particles
                    )
                ),
            )
            for row in store.frames_since("R1", 0.0, particles=True)
        )
    finally:
        store.close()


def test_worker_processes_and_threads_record_the_same_frames(tmp_path: Path) -> None:
    """The same frame files give the same rows, counts and particle sizes whether the
    frames' work runs in worker processes or on threads."""
    simulator = FrameSimulator(FrameConfig(profile=ConstantProfile(0.3)), seed=33)
    frames = [simulator.render(10.0 * k)[0] for k in range(6)]
    in_processes = _classify_folder(tmp_path / "processes", frames, processes=True)
    on_threads = _classify_folder(tmp_path / "threads", frames, processes=False)
    assert len(in_processes) == 6 and {row[1] for row in in_processes} == {"ok"}
    assert sum(len(row[3]) for row in in_processes) >= 60
    without = [(*row[:3], tuple((p[0], p[1], p[3]) for p in row[3])) for row in in_processes]
    assert without == [(*row[:3], tuple((p[0], p[1], p[3]) for p in row[3])) for row in on_threads]
    # Confidences may differ in the last bits: a batch mixes other crops in each run.
    here = [p[2] for row in in_processes for p in row[3]]
    there = [p[2] for row in on_threads for p in row[3]]
    assert np.allclose(here, there, atol=1e-4)
