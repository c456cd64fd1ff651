"""A safe model swap: a changed `model.path` is loaded, checked, warmed up and swapped in
between batches on SIGHUP; a candidate that fails any step is refused with the reason
and the running model keeps going; no frame is lost or counted twice across the swap,
and every frame row and window names the model behind it."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from monitor.inference.backend import Backend
from monitor.manifest import default_model_dir, load_manifest
from monitor.pipeline.batcher import MicroBatcher
from monitor.runtime.model_swap import candidate_problems
from monitor.simulator import CropSimulator
from tests.daemon_process import DaemonProcess, export, wait_for, write_like_probe
from tests.notify_listener import Listener


def _model_copy(tmp_path: Path, name: str, **manifest_changes: object) -> Path:
    """The shipped model under another directory with manifest fields changed."""
    directory = tmp_path / name
    shutil.copytree(default_model_dir(), directory)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(manifest_changes)
    manifest_path.write_text(json.dumps(manifest))
    return directory


# -- the checks (pure) --------------------------------------------------------------------


def test_a_new_version_of_the_same_classes_may_replace_the_running_model(tmp_path: Path) -> None:
    running = load_manifest(default_model_dir())
    candidate = load_manifest(_model_copy(tmp_path, "v3", version="3.0"))
    assert candidate_problems(running, candidate) == []


def test_candidates_that_would_change_what_the_plant_is_told_are_refused(tmp_path: Path) -> None:
    running = load_manifest(default_model_dir())
    renamed = load_manifest(_model_copy(tmp_path, "classes", classes=["PG", "CEX"], version="3"))
    (problem,) = candidate_problems(running, renamed)
    assert problem.startswith("classes ['PG', 'CEX'] differ from the running ['CEX', 'PG']")

    guardrails = {"min_macro_f1": 0.9, "min_class_recall": 0.8, "passed": False,
                  "problems": ["PG recall 0.41 < 0.80"]}  # fmt: skip
    forced = load_manifest(_model_copy(tmp_path, "forced", guardrails=guardrails, version="3"))
    (problem,) = candidate_problems(running, forced)
    assert "exported past its guardrails (PG recall 0.41 < 0.80)" in problem

    blind_dir = _model_copy(tmp_path, "no-ood", ood=None, output="probabilities", version="3")
    blind = load_manifest(blind_dir)
    (problem,) = candidate_problems(running, blind)
    assert problem.startswith("the model has no out-of-distribution check")

    same = load_manifest(_model_copy(tmp_path, "same"))
    assert candidate_problems(running, same) == [
        "it is the model already running (same name, version and sha256)"
    ]


# -- the batcher across a swap (fake backends: the logic, not the model) --------------------


class _RecordingBackend:
    """Answers each crop with its own first pixel, so rows can be traced to their crops."""

    def __init__(self, name: str, delay_s: float = 0.0) -> None:
        self.name = name
        self.batches: list[list[float]] = []
        self.closed = False
        self._delay_s = delay_s

    def infer(self, batch: np.ndarray) -> np.ndarray:
        assert not self.closed, f"{self.name} ran a batch after it was closed"
        time.sleep(self._delay_s)
        values = [float(v) for v in batch[:, 0, 0, 0]]
        self.batches.append(values)
        return np.stack([np.array(values), np.zeros(len(values))], axis=1).astype(np.float32)

    def close(self) -> None:
        self.closed = True


def test_a_batch_never_mixes_models_and_the_old_backend_closes_after_its_last_crop() -> None:
    old, new = _RecordingBackend("old", delay_s=0.05), _RecordingBackend("new")
    batcher = MicroBatcher(old, max_batch=8, max_wait_s=0.01, queue_crops=64)
    delivered: dict[float, float] = {}
    lock = threading.Lock()

    def on_done(rows: np.ndarray | None, error: str | None) -> None:
        assert rows is not None and error is None
        with lock:
            for value in rows[:, 0].tolist():
                delivered[value] = value

    def crops(first: int, count: int) -> np.ndarray:
        batch = np.zeros((count, 3, 2, 2), np.float32)
        batch[:, 0, 0, 0] = np.arange(first, first + count)
        return batch

    backend_old: Backend = old
    backend_new: Backend = new
    batcher.start()
    try:
        for frame in range(6):  # queued for the old model, 3 crops a frame
            assert batcher.submit(crops(frame * 3, 3), on_done, backend=backend_old)
        batcher.use_backend(backend_new)
        batcher.retire(backend_old)
        assert not old.closed, "closed while its crops were still queued"
        for frame in range(6, 12):
            assert batcher.submit(crops(frame * 3, 3), on_done, backend=backend_new)
        assert wait_for(lambda: len(delivered) == 36, timeout=10, interval=0.02)
        assert wait_for(lambda: old.closed, timeout=5, interval=0.02)
    finally:
        batcher.stop()
    ran_old = sorted(v for batch in old.batches for v in batch)
    ran_new = sorted(v for batch in new.batches for v in batch)
    assert ran_old == [float(v) for v in range(18)]  # every old crop once, on the old model
    assert ran_new == [float(v) for v in range(18, 36)]
    assert not new.closed
    assert sorted(delivered) == [float(v) for v in range(36)]


def test_retiring_an_idle_backend_closes_it_at_once() -> None:
    old, new = _RecordingBackend("old"), _RecordingBackend("new")
    batcher = MicroBatcher(old, max_batch=4, max_wait_s=0.01, queue_crops=16)
    batcher.use_backend(new)
    batcher.retire(old)
    assert old.closed and not new.closed


# -- the daemon under SIGHUP, with frames flowing ---------------------------------------


def _config(path: Path, state: Path, folder: Path, model: Path | None) -> Path:
    model_line = "" if model is None else f'path = "{model}"'
    path.write_text(
        f"""
[daemon]
state_dir = "{state}"
log_format = "json"
shutdown_grace = "5s"

[model]
{model_line}

[aggregation]
publish_interval = "1s"
windows = ["1m", "5m"]

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


def _log_events(daemon: DaemonProcess, event: str) -> list[dict[str, object]]:
    lines = [line for line in daemon.log_text().splitlines() if line.startswith("{")]
    return [record for line in lines if (record := json.loads(line)).get("event") == event]


class _ProbeWriter:
    """Writes crops into the probe folder the way vendor software does, until stopped."""

    def __init__(self, folder: Path, interval_s: float = 0.03) -> None:
        self._folder = folder
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._simulator = CropSimulator(seed=5)
        self.written: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            name = f"crop_{index:05d}.png"
            write_like_probe(self._folder, name, self._simulator.render(("CEX", "PG")[index % 2]))
            self.written.append(name)
            index += 1
            time.sleep(self._interval_s)

    def __enter__(self) -> _ProbeWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_sighup_swaps_the_model_while_frames_flow_without_losing_or_doubling_one(
    tmp_path: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    folder = tmp_path / "probe"
    folder.mkdir()
    state = tmp_path / "state"
    running = load_manifest(default_model_dir()).manifest
    candidate_dir = _model_copy(tmp_path, "candidate", version="3.0-site")
    wrong_dir = _model_copy(tmp_path, "wrong-classes", classes=["PG", "CEX"], version="9")
    config = _config(tmp_path / "config.toml", state, folder, None)
    export_config = _config(tmp_path / "export.toml", state, folder, None)

    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        listener.wait_for("READY", timeout=120)
        with _ProbeWriter(folder) as writer:
            assert wait_for(lambda: len(export(export_config)) >= 20, timeout=60)

            # A candidate with another class list: refused, the running model goes on.
            _config(config, state, folder, wrong_dir)
            daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            ready, _ = listener.wait_for("READY", timeout=60)
            assert "model swap refused, running cex-pg-lite0-96:2.0:" in ready["STATUS"]
            (refused,) = _log_events(daemon, "model_swap_refused")
            assert str(refused["reason"]).startswith("classes ['PG', 'CEX'] differ")
            assert refused["action"] == "kept the running model"

            # A good candidate: swapped while the writer keeps writing.
            _config(config, state, folder, candidate_dir)
            daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            ready, _ = listener.wait_for("READY", timeout=60)
            assert "model swapped: cex-pg-lite0-96:2.0:" in ready["STATUS"]
            assert "-> cex-pg-lite0-96:3.0-site:" in ready["STATUS"]
            before = len(writer.written)
            assert wait_for(lambda: len(writer.written) >= before + 30, timeout=30)
        written = list(writer.written)
        assert wait_for(lambda: len(export(export_config)) == len(written), timeout=90)
        frames = export(export_config)
        windows = export(export_config, "windows")
        (swapped,) = _log_events(daemon, "model_swapped")
        retired = _log_events(daemon, "backend_retired")
        assert daemon.terminate() == 0

    keys = [row["key"] for row in frames]
    assert sorted(keys) == sorted(written), "a frame was lost or counted twice"
    assert len(set(keys)) == len(keys)
    assert {row["status"] for row in frames} <= {"ok", "rejected"}  # the quality gate's
    classified = [row for row in frames if row["status"] == "ok"]
    assert len(classified) >= 0.8 * len(frames)
    assert all(row["model_version"] == "" for row in frames if row["status"] != "ok")
    versions = [row["model_version"] for row in classified]  # in recording order
    assert set(versions) == {running.version, "3.0-site"}
    first_new = versions.index("3.0-site")
    assert versions[first_new:] == ["3.0-site"] * (len(versions) - first_new), (
        "after the swap no frame may be classified by the old model"
    )
    assert {row["model_sha256"] for row in classified} == {running.onnx_sha256}
    assert str(swapped["current"]).startswith("cex-pg-lite0-96:3.0-site:")
    assert len(retired) == 1, "the old backend is closed once, after its last batch"
    # A window holding frames of both models says so; windows before the swap do not.
    spanning = [row for row in windows if row["spans_model_swap"] == "True"]
    assert spanning, "no stored window says it spans the swap"
    assert all(" -> " in row["models"] for row in spanning)
    assert any(row["spans_model_swap"] == "False" for row in windows)
