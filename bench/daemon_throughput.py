"""The daemon end to end, against ONNX Runtime alone, measured in one run on one machine.

1. Crop mode throughput: N crop files renamed into a watched folder until their rows
   are in the store, divided by ONNX-Runtime-only crops/s of the same model and batch
   size on preloaded tensors.
2. Latency: 4 probes x 10 frames/s in crop mode, from rename to stored row (p50/p99).
3. Frame mode: frames/s for 1360 x 1024 PNG frames with about 30 particles, and where
   the time goes (decode, quality gate, segmentation, preprocessing, inference).

    python -m bench.daemon_throughput [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from bench.memory_soak import memory_mib
from bench.report import machine_line, replace_section
from monitor.config.settings import QualityConfig, load_settings
from monitor.daemon import Daemon
from monitor.imaging.decode import decode_image
from monitor.imaging.particle_size import measure_mask
from monitor.imaging.preprocess import prepare_batch
from monitor.inference.factory import resolve_backend
from monitor.manifest import load_manifest
from monitor.pipeline.quality_gate import assess_frame
from monitor.pipeline.sampling import ParticleSampler, main_object_mask
from monitor.simulator import ConstantProfile, CropSimulator, FrameConfig, FrameSimulator
from monitor.store import Store

MODEL_DIR: Path | None = None  # --model; None = the shipped default model
BACKEND = "auto"  # the daemon's backend.type (bench.scaling --backend)


def _settings(  # type: ignore[no-untyped-def]
    state: Path,
    folders: dict[str, Path],
    sampling: str,
    max_batch: int,
    batcher: dict[str, object] | None = None,
):
    return load_settings(
        data={
            "model": {"path": str(MODEL_DIR)} if MODEL_DIR else {},
            "backend": {"type": BACKEND},
            "daemon": {"state_dir": str(state), "log_level": "warning"},
            "batcher": {"max_batch": max_batch, "max_wait": "10ms", **(batcher or {})},
            "probes": [
                {
                    "id": probe,
                    "sampling": sampling,
                    "source": {"type": "folder", "path": str(folder), "backlog": "none"},
                }
                for probe, folder in folders.items()
            ],
        }
    )


def onnxruntime_only(crops: list[np.ndarray], batch: int) -> float:
    model = load_manifest(MODEL_DIR)
    backend = resolve_backend("onnxruntime", model)
    tensors = prepare_batch(crops, model.manifest.input)
    backend.infer(tensors[:batch])
    started = time.perf_counter()
    for offset in range(0, len(tensors), batch):
        backend.infer(tensors[offset : offset + batch])
    return len(tensors) / (time.perf_counter() - started)


def crop_stage_costs(crops: list[np.ndarray], encoded: list[bytes], batch: int) -> dict[str, float]:
    """Per-crop cost of each stage on one thread, in ms: what a crop costs a core whatever
    the daemon's threading does. Their sum bounds the end-to-end rate from above."""
    model = load_manifest(MODEL_DIR)
    spec = model.manifest.input
    backend = resolve_backend("onnxruntime", model, threads=1)
    quality = QualityConfig()
    count = len(encoded)
    t0 = time.perf_counter()
    for data in encoded:
        decode_image(data)
    t1 = time.perf_counter()
    for crop in crops:
        assess_frame(crop, quality)
    t2 = time.perf_counter()
    tensors = np.concatenate([prepare_batch([crop], spec) for crop in crops])
    t3 = time.perf_counter()
    backend.infer(tensors[:batch])
    t4 = time.perf_counter()
    for offset in range(0, count, batch):
        backend.infer(tensors[offset : offset + batch])
    t5 = time.perf_counter()
    backend.close()
    t6 = time.perf_counter()
    for crop in crops:  # what the crop-mode sampler and the worker add for the size
        measure_mask(main_object_mask(crop))
    t7 = time.perf_counter()
    return {
        "decode (PNG)": (t1 - t0) * 1000 / count,
        "quality gate": (t2 - t1) * 1000 / count,
        "object mask and size": (t7 - t6) * 1000 / count,
        "preprocess": (t3 - t2) * 1000 / count,
        "inference, one thread": (t5 - t4) * 1000 / count,
    }


def _stage_files(folder: Path, encoded: list[bytes], prefix: str) -> list[tuple[Path, Path]]:
    pairs = []
    for index, data in enumerate(encoded):
        final = folder / f"{prefix}_{index:06d}.png"
        temporary = folder / f".{final.name}.part"
        temporary.write_bytes(data)
        pairs.append((temporary, final))
    return pairs


def _wait_recorded(daemon: Daemon, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while daemon.recorder.recorded < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {daemon.recorder.recorded} of {count} frames stored")
        time.sleep(0.005)


def files_per_s(
    root: Path, encoded: list[bytes], sampling: str, batcher: dict[str, object] | None, batch: int
) -> tuple[float, float]:
    """(files/s renamed into a watched folder until stored, MiB PSS of this process and
    its children, worker processes included, right after)."""
    folder = Path(tempfile.mkdtemp(prefix=sampling, dir=root))
    pairs = _stage_files(folder, encoded, sampling)
    daemon = Daemon(_settings(folder / "state", {"R1": folder}, sampling, batch, batcher))
    daemon.start()
    time.sleep(1.0)
    try:
        started = time.perf_counter()
        for temporary, final in pairs:
            os.replace(temporary, final)
        _wait_recorded(daemon, len(pairs), timeout=900)
        rate = len(pairs) / (time.perf_counter() - started)
        return rate, memory_mib(os.getpid())[1]
    finally:
        daemon.stop()


def daemon_crops_per_s(
    root: Path, encoded: list[bytes], batch: int, batcher: dict[str, object] | None = None
) -> float:
    return files_per_s(root, encoded, "whole", batcher, batch)[0]


def latency_at_rate(
    root: Path,
    encoded: list[bytes],
    probes: int,
    fps: float,
    seconds: float,
    *,
    batcher: dict[str, object] | None = None,
) -> np.ndarray:
    root = Path(tempfile.mkdtemp(prefix="lat", dir=root))
    folders = {f"P{i}": root / f"lat{i}" for i in range(probes)}
    staged = {}
    per_probe = int(fps * seconds)
    for probe, folder in folders.items():
        folder.mkdir()
        staged[probe] = _stage_files(folder, encoded[:per_probe], probe)
    daemon = Daemon(_settings(root / "state-lat", folders, "whole", 32, batcher))
    daemon.start()
    time.sleep(1.0)
    renamed: dict[tuple[str, str], float] = {}
    try:

        def probe_writer(probe: str) -> None:
            next_at = time.monotonic()
            for temporary, final in staged[probe]:
                os.replace(temporary, final)
                renamed[(probe, final.name)] = time.time()
                next_at += 1 / fps
                time.sleep(max(0.0, next_at - time.monotonic()))

        threads = [threading.Thread(target=probe_writer, args=(p,)) for p in folders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        _wait_recorded(daemon, probes * per_probe, timeout=120)
    finally:
        daemon.stop()
    store = Store(root / "state-lat", readonly=True)
    latencies = [row.stored_at - renamed[(row.probe, row.key)] for row in store.iter_frames()]
    store.close()
    return np.array(latencies)


def frame_mode(root: Path, count: int) -> tuple[float, dict[str, float], float, float]:
    """(frames/s end to end, ms per stage per frame, particles drawn and crops segmented
    per frame)."""
    simulator = FrameSimulator(FrameConfig(profile=ConstantProfile(0.2)), seed=21)
    encoded = []
    particles = []
    for index in range(count):
        image, truth = simulator.render(float(index))
        encoded.append(cv2.imencode(".png", image)[1].tobytes())
        particles.append(len(truth))
    # Where the time goes: each stage timed alone over the same frames, one thread.
    model = load_manifest()
    backend = resolve_backend("onnxruntime", model)
    sampler = ParticleSampler(
        load_settings(data={"probes": [{"id": "x", "source": {"type": "simulated"}}]})
        .probes[0]
        .particles
    )
    stages = dict.fromkeys(
        ("decode", "quality gate", "segmentation", "sizes", "preprocess", "inference"), 0.0
    )
    segmented = 0
    for data in encoded:
        t0 = time.perf_counter()
        grey = decode_image(data)
        t1 = time.perf_counter()
        assess_frame(grey, QualityConfig())
        t2 = time.perf_counter()
        crops = sampler.sample(grey)
        segmented += len(crops)
        t3 = time.perf_counter()
        for crop in crops:
            if crop.mask is not None:
                measure_mask(crop.mask)
        t3s = time.perf_counter()
        tensors = prepare_batch([c.image for c in crops], model.manifest.input)
        t4 = time.perf_counter()
        backend.infer(tensors)
        t5 = time.perf_counter()
        for name, seconds in zip(
            stages, (t1 - t0, t2 - t1, t3 - t2, t3s - t3, t4 - t3s, t5 - t4), strict=True
        ):
            stages[name] += seconds * 1000 / count
    folder = root / "frames"
    folder.mkdir()
    pairs = _stage_files(folder, encoded, "frame")
    daemon = Daemon(_settings(root / "state-frames", {"R1": folder}, "particles", 32))
    daemon.start()
    time.sleep(1.0)
    try:
        started = time.perf_counter()
        for temporary, final in pairs:
            os.replace(temporary, final)
        _wait_recorded(daemon, len(pairs), timeout=600)
        fps = len(pairs) / (time.perf_counter() - started)
    finally:
        daemon.stop()
    return fps, stages, float(np.mean(particles)), segmented / count


def _frame_lines(frames: tuple[float, dict[str, float], float, float]) -> list[str]:
    frames_per_s, stages, particles, segmented = frames
    lines = [
        f"| frame mode, 1360 x 1024 PNG, {particles:.0f} particles drawn | "
        f"{frames_per_s:.1f} fps |",
        f"| frame mode, crops classified end to end ({segmented:.1f} segmented per frame) | "
        f"{frames_per_s * segmented:.0f} crops/s |",
    ]
    lines += [
        f"| frame mode, {name} per frame (one thread) | {ms:.1f} ms |"
        for name, ms in stages.items()
    ]
    return lines


def _ms(latencies: np.ndarray, q: float) -> str:
    return f"{np.percentile(latencies, q) * 1000:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument(
        "--model", type=Path, default=None, help="model directory (default: shipped)"
    )
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the crop throughput ratio (for models too slow for 40 crops/s)",
    )
    parser.add_argument(
        "--frames-only", action="store_true", help="only frame mode (the CPU speed floor)"
    )
    parser.add_argument("--write", action="store_true", help="record the tables in BENCHMARKS.md")
    args = parser.parse_args()
    global MODEL_DIR  # noqa: PLW0603 - one setting for the whole run, from the command line
    MODEL_DIR = args.model
    model_name = load_manifest(MODEL_DIR).manifest.name
    if args.frames_only:
        with tempfile.TemporaryDirectory() as tmp:
            frames_table = _frame_lines(frame_mode(Path(tmp), args.frames))
        table = "\n".join(["| measurement | value |", "|---|---:|", *frames_table])
        _report(table, f"daemon: frame mode, {model_name}", model_name, write=args.write)
        return 0
    simulator = CropSimulator(seed=8)
    crops = [simulator.render("PG" if i % 5 == 0 else "CEX") for i in range(200)]
    crops = [crops[i % len(crops)] for i in range(args.crops)]
    encoded = [cv2.imencode(".png", c)[1].tobytes() for c in crops]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ort = onnxruntime_only(crops, args.batch)
        stage_ms = crop_stage_costs(crops[:1000], encoded[:1000], args.batch)
        e2e = daemon_crops_per_s(root, encoded, args.batch)
        latencies = (
            None
            if args.throughput_only
            else latency_at_rate(root, encoded, probes=4, fps=10.0, seconds=args.latency_seconds)
        )
        frames = None if args.throughput_only else frame_mode(root, args.frames)
    rate = "4 probes x 10 frames/s"
    lines = [
        "| measurement | value |",
        "|---|---:|",
        f"| ONNX Runtime alone, preloaded tensors, batch {args.batch} | {ort:.0f} crops/s |",
        f"| daemon end to end, {args.crops} crop files renamed in | {e2e:.0f} crops/s |",
        f"| **ratio end-to-end / ONNX Runtime alone** | **{e2e / ort:.2f}** |",
    ]
    lines += [f"| crop mode, {name} per crop | {ms:.3f} ms |" for name, ms in stage_ms.items()]
    cores = os.cpu_count() or 1
    ceiling = cores * 1000 / sum(stage_ms.values())
    lines.append(
        f"| ceiling: {cores} cores / sum of the stages above | {ceiling:.0f} crops/s "
        f"(ratio {ceiling / ort:.2f}) |"
    )
    if latencies is not None:
        lines += [
            f"| latency rename -> stored, {rate}, p50 | {_ms(latencies, 50)} |",
            f"| latency rename -> stored, {rate}, p99 | {_ms(latencies, 99)} |",
        ]
    if frames is not None:
        lines += _frame_lines(frames)
    _report("\n".join(lines), f"daemon: end to end, {model_name}", model_name, write=args.write)
    return 0


def _report(table: str, title: str, model_name: str, *, write: bool) -> None:
    """Print the table; with --write, record it in BENCHMARKS.md under `title`."""
    print(table)
    if write:
        command = "python -m bench.daemon_throughput " + " ".join(sys.argv[1:])
        body = f"{machine_line()}; model `{model_name}`.\n\nCommand: `{command}`\n\n{table}\n"
        replace_section(Path("BENCHMARKS.md"), title, body)


if __name__ == "__main__":
    sys.exit(main())
