"""The shadow runner: a candidate model classifies a share of the live frames' crops again,
the two are compared frame by frame into the shadow record, labelled review crops are
scored, and nothing the candidate does (falling behind, failing) costs the live count.

The shipped model plays both parts through ONNX Runtime; the candidate is a copy with a
changed manifest, so its calls differ in a known way (a stricter confidence threshold
makes it say "I don't know" more often)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monitor.config.shadow import ShadowConfig
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
from monitor.manifest import ModelIdentity, default_model_dir, load_manifest
from monitor.pipeline.active_model import ActiveModel
from monitor.pipeline.outcome import ClassifiedCrop, ClassifiedFrame
from monitor.review.sample_store import NewSample, SampleStore
from monitor.shadow.runner import ShadowRunner, compare_frame, same_call
from monitor.shadow.store import ShadowStore
from monitor.simulator import CropSimulator
from monitor.sources.base import FrameItem
from tests.daemon_process import DaemonProcess, export, wait_for, write_like_probe
from tests.notify_listener import Listener

LIVE = ModelIdentity("live-model", "1", "a" * 64)


def _item(key: str, ts: float, probe: str = "R1") -> FrameItem:
    return FrameItem(probe=probe, key=key, ts=ts, read=lambda: np.zeros((8, 8), np.uint8))


def _active(directory: Path) -> ActiveModel:
    loaded = load_manifest(directory)
    return ActiveModel(loaded, OnnxRuntimeBackend(loaded, threads=1))


def _model_copy(tmp_path: Path, name: str, **changes: object) -> Path:
    directory = tmp_path / name
    shutil.copytree(default_model_dir(), directory)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(changes)
    manifest_path.write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def live() -> ActiveModel:
    return _active(default_model_dir())


@pytest.fixture(scope="module")
def crops() -> list[tuple[str, np.ndarray]]:
    simulator = CropSimulator(seed=11)
    return [(label, simulator.render(label)) for label in ("CEX", "PG") * 12]


def _frames(
    live: ActiveModel, crops: list[tuple[str, np.ndarray]], per_frame: int = 4
) -> list[ClassifiedFrame]:
    """The live model's real decisions on the crops, `per_frame` crops a frame."""
    images = [image for _, image in crops]
    runner_like = ShadowRunner(
        ShadowConfig(path=Path("unused")),
        live,
        None,
        None,
        max_batch=16,  # type: ignore[arg-type]
    )
    decisions = runner_like.classify(images)
    frames = []
    for start in range(0, len(images), per_frame):
        frame_crops = tuple(
            ClassifiedCrop(image, (0, 0, image.shape[1], image.shape[0]), np.zeros(3), decision)
            for image, decision in zip(
                images[start : start + per_frame], decisions[start : start + per_frame], strict=True
            )
        )
        item = _item(f"frame_{start:03d}.png", 1_000.0 + start)
        frames.append(ClassifiedFrame(item, frame_crops, live.manifest.classes, LIVE, "B1"))
    return frames


def test_the_same_network_agrees_on_every_crop_and_its_fractions_do_not_differ(
    tmp_path: Path, live: ActiveModel, crops: list[tuple[str, np.ndarray]]
) -> None:
    store = ShadowStore(tmp_path / "shadow")
    candidate = _active(_model_copy(tmp_path, "same-network", version="2.1"))
    runner = ShadowRunner(
        ShadowConfig(path=tmp_path / "same-network", share=1.0), candidate, store, None,
        max_batch=3,  # fewer than a frame's crops: the candidate takes them in chunks
    )  # fmt: skip
    frames = _frames(live, crops)
    runner.start()
    for frame in frames:
        runner.observe(frame)
    runner.stop()
    counts = runner.status_counts()
    assert counts["compared"] == len(frames) == 6
    assert (counts["skipped"], counts["failed"], counts["not_drawn"]) == (0, 0, 0)
    rows = store.frames()
    assert [frame.ts for frame, _, _ in rows] == [f.item.ts for f in frames]
    for (comparison, live_label, candidate_label), frame in zip(rows, frames, strict=True):
        assert comparison.agreed == comparison.crops == 4
        assert comparison.live_counts == comparison.candidate_counts
        expected = [0, 0]
        for crop in frame.crops:
            if crop.decision.status == "ok":
                expected[live.manifest.classes.index(crop.decision.label)] += 1
        assert list(comparison.live_counts) == expected
        assert live_label == LIVE.label
        assert candidate_label == candidate.identity.label


def test_a_stricter_candidate_is_recorded_as_disagreeing_where_it_says_i_dont_know(
    tmp_path: Path, live: ActiveModel, crops: list[tuple[str, np.ndarray]]
) -> None:
    store = ShadowStore(tmp_path / "shadow")
    strict = _active(_model_copy(tmp_path, "strict", version="9", uncertainty_threshold=0.9999))
    runner = ShadowRunner(
        ShadowConfig(path=tmp_path / "strict", share=1.0), strict, store, None, max_batch=16
    )
    frames = _frames(live, crops)
    runner.start()
    for frame in frames:
        runner.observe(frame)
    runner.stop()
    rows = store.frames()
    assert len(rows) == len(frames)
    for (comparison, _, _), frame in zip(rows, frames, strict=True):
        theirs = strict.rule.decide(
            strict.backend.infer(np.stack([_prepared(strict, crop.image) for crop in frame.crops]))
        )
        expected_agreed = sum(
            same_call(crop.decision, d) for crop, d in zip(frame.crops, theirs, strict=True)
        )
        assert comparison.agreed == expected_agreed
        assert sum(comparison.candidate_counts) == sum(d.status == "ok" for d in theirs)
    total_live = sum(sum(c.live_counts) for c, _, _ in rows)
    total_candidate = sum(sum(c.candidate_counts) for c, _, _ in rows)
    assert total_candidate < total_live, "the stricter candidate must be sure less often"
    assert sum(c.agreed for c, _, _ in rows) < sum(c.crops for c, _, _ in rows)


def _prepared(model: ActiveModel, image: np.ndarray) -> np.ndarray:
    from monitor.imaging.preprocess import prepare_image

    return prepare_image(image, model.manifest.input)


def test_compare_frame_counts_only_certain_calls_and_agreement_includes_both_unsure() -> None:
    from monitor.inference.decision import Decision

    ok_cex = Decision("CEX", 0.9, "ok")
    ok_pg = Decision("PG", 0.9, "ok")
    unsure = Decision("PG", 0.55, "uncertain", "low_confidence")
    ood = Decision("CEX", 0.99, "uncertain", "out_of_distribution", 40.0)
    image = np.zeros((8, 8), np.uint8)
    live_calls = [ok_cex, ok_cex, unsure, ok_pg, ood]
    candidate_calls = [ok_cex, ok_pg, ood, unsure, ok_cex]
    frame = ClassifiedFrame(
        _item("f.png", 5.0, probe="R2"),
        tuple(ClassifiedCrop(image, (0, 0, 8, 8), np.zeros(3), d) for d in live_calls),
        ("CEX", "PG"),
        LIVE,
    )
    comparison = compare_frame(frame, candidate_calls)
    assert (comparison.probe, comparison.ts, comparison.crops) == ("R2", 5.0, 5)
    assert comparison.live_counts == (2, 1)
    assert comparison.candidate_counts == (2, 1)
    # agree: crop 0 (CEX, CEX), crop 2 (both unsure); not: 1 (CEX/PG), 3 (PG/unsure), 4.
    assert comparison.agreed == 2


class _FailingBackend:
    name = "failing"

    def __init__(self) -> None:
        self.calls = 0

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        raise RuntimeError("CUDA error: an illegal memory access")

    def close(self) -> None:
        pass


def test_share_full_queue_and_failures_are_counted_and_never_raise_into_the_worker(
    tmp_path: Path, live: ActiveModel, crops: list[tuple[str, np.ndarray]]
) -> None:
    frames = _frames(live, crops, per_frame=1)  # 24 frames
    store = ShadowStore(tmp_path / "shadow")
    config = ShadowConfig(path=tmp_path, share=0.5, queue_size=1)
    # Not started: the queue holds one frame and every further drawn frame is skipped.
    runner = ShadowRunner(config, live, store, None, max_batch=8, rng=random.Random(3))
    for frame in frames:
        runner.observe(frame)
    draws = random.Random(3)
    expected_drawn = sum(draws.random() < 0.5 for _ in frames)
    counts = runner.status_counts()
    assert counts["offered"] == 24
    assert counts["not_drawn"] == 24 - expected_drawn
    assert counts["skipped"] == expected_drawn - 1
    # The candidate's own frames (after a promotion) are not compared with themselves.
    own = ClassifiedFrame(frames[0].item, frames[0].crops, frames[0].classes, live.identity)
    runner.observe(own)
    assert runner.status_counts()["same_model"] == 1

    failing = ActiveModel(live.loaded, _FailingBackend())  # type: ignore[arg-type]
    broken = ShadowRunner(ShadowConfig(path=tmp_path, share=1.0), failing, store, None, max_batch=8)
    broken.start()
    for frame in frames[:5]:
        broken.observe(frame)  # must not raise
    broken.stop()
    assert broken.status_counts()["failed"] == 5
    assert broken.status_counts()["compared"] == 0


def test_labelled_review_crops_are_scored_once_each_and_the_report_scores_both_models(
    tmp_path: Path, live: ActiveModel, crops: list[tuple[str, np.ndarray]]
) -> None:
    from monitor.shadow.report import shadow_report

    samples = SampleStore(tmp_path / "samples", ("CEX", "PG"), max_samples=100)
    decisions = ShadowRunner(
        ShadowConfig(path=tmp_path),
        live,
        None,
        None,
        max_batch=16,  # type: ignore[arg-type]
    ).classify([image for _, image in crops])
    for index, (truth, image) in enumerate(crops):
        sample_id = samples.add(
            NewSample(
                probe="R1", frame_key=f"c{index}.png", ts=100.0 + index, batch=None,
                bbox=(0, 0, image.shape[1], image.shape[0]), model=LIVE.label,
                guess="PG" if truth == "CEX" else "CEX",  # the live model got every one wrong
                confidence=0.9, probabilities={"CEX": 0.5, "PG": 0.5}, status="ok",
                decision_reason=None, ood_score=None, kept_because="random", kept_at=200.0,
            ),
            image,
        )  # fmt: skip
        if index < 20:
            samples.set_label(sample_id, truth, operator="Ana", at=300.0)
    store = ShadowStore(tmp_path / "shadow")
    candidate = _active(_model_copy(tmp_path, "candidate", version="7"))
    runner = ShadowRunner(
        ShadowConfig(path=tmp_path / "candidate", share=1.0),
        candidate,
        store,
        samples,
        max_batch=16,
    )
    assert runner.score_labelled() == 20
    assert runner.score_labelled() == 0, "a crop is scored once per candidate"
    samples.set_label(21, crops[20][0], operator="Ana", at=301.0)  # id 21 is crop 20
    assert runner.score_labelled() == 1
    calls = store.labelled(candidate.identity.label)
    assert sorted(calls) == [*range(1, 21), 21]
    for sample_id, call in calls.items():
        assert (call.guess, call.status) == (
            decisions[sample_id - 1].label,
            decisions[sample_id - 1].status,
        )

    # One compared frame so the report has a candidate; then both models on the labels.
    runner.start()
    runner.observe(_frames(live, crops)[0])
    runner.stop()
    report = shadow_report(store, samples, window_s=300.0)
    labelled = report["labelled"]
    right = sum(
        1
        for sample_id, call in calls.items()
        if call.status == "ok" and call.guess == (samples.get(sample_id).label)  # type: ignore[union-attr]
    )
    assert labelled["crops"] == 21
    assert labelled["live_accuracy"] == 0.0
    assert labelled["candidate_accuracy"] == pytest.approx(right / 21)
    assert right >= 15, "the shipped network should call most simulator crops right"
    assert labelled["only_candidate_right"] == right and labelled["only_live_right"] == 0


# -- in the daemon -------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "monitor", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)


def _daemon_config(path: Path, state: Path, folder: Path, shadow: Path | None) -> Path:
    section = "" if shadow is None else f'[model.shadow]\npath = "{shadow}"\nshare = 1.0\n'
    path.write_text(
        f"""
[daemon]
state_dir = "{state}"
log_format = "json"
shutdown_grace = "5s"

[model]
{section}
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


def test_a_configured_shadow_runs_from_the_start_is_reported_and_stops_on_reload(
    tmp_path: Path, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    folder, state = tmp_path / "probe", tmp_path / "state"
    folder.mkdir()
    strict = _model_copy(tmp_path, "strict", version="9-strict", uncertainty_threshold=0.9999)
    config = _daemon_config(tmp_path / "config.toml", state, folder, strict)
    simulator = CropSimulator(seed=3)
    names = [f"crop_{i:04d}.png" for i in range(30)]
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.start()
        listener.wait_for("READY", timeout=120)
        for index, name in enumerate(names):
            write_like_probe(folder, name, simulator.render(("CEX", "PG")[index % 2]))
        assert wait_for(lambda: len(export(config)) == 30, timeout=120)

        def compared() -> int:
            done = _cli("shadow", "report", "--state-dir", str(state), "--json")
            return int(json.loads(done.stdout).get("frames", 0)) if done.stdout else 0

        assert wait_for(lambda: compared() == 30, timeout=60)
        text = _cli("shadow", "report", "--config", str(config), "--window", "1h")
        _daemon_config(config, state, folder, None)
        daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        ready, _ = listener.wait_for("READY", timeout=60)
        assert "shadow model stopped" in ready["STATUS"]
        assert daemon.terminate() == 0
        stopped = [
            json.loads(line)
            for line in daemon.log_text().splitlines()
            if line.startswith("{") and '"shadow_stopped"' in line
        ]
    frames = export(config)
    assert sorted(row["key"] for row in frames) == names
    assert {row["model_version"] for row in frames if row["status"] == "ok"} == {"2.0"}
    assert len(stopped) == 1 and stopped[0]["compared"] == 30 and stopped[0]["failed"] == 0

    store = ShadowStore(state / "shadow", create=False)
    rows = store.frames()
    store.close()
    live_sure = sum(sum(c.live_counts) for c, _, _ in rows)
    strict_sure = sum(sum(c.candidate_counts) for c, _, _ in rows)
    assert live_sure == sum(int(row["n_CEX"]) + int(row["n_PG"]) for row in frames)
    assert strict_sure < live_sure
    assert text.returncode == 1, text.stderr  # not enough evidence: the verdict says no
    assert "candidate cex-pg-lite0-96:9-strict:" in text.stdout
    assert "from the start to now, windows of 3600 s: 30 frames, 30 crops" in text.stdout
    assert "verdict: do not promote yet" in text.stdout
    assert "0 labelled crops scored by both models, 50 needed: label more crops" in text.stdout


def test_shadow_report_says_what_is_missing_with_its_exit_status(tmp_path: Path) -> None:
    missing = _cli("shadow", "report", "--state-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 66
    assert "no shadow record at" in missing.stderr and "[model.shadow]" in missing.stderr
    bad_time = _cli("shadow", "report", "--state-dir", str(tmp_path), "--since", "yesterday")
    assert bad_time.returncode == 64
    assert "2026-12-03T14:00:00Z" in bad_time.stderr
    bad_window = _cli("shadow", "report", "--state-dir", str(tmp_path), "--window", "5")
    assert bad_window.returncode == 64 and "at least 10 s" in bad_window.stderr
