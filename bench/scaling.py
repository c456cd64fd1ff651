"""How the daemon grows with the cores: 1..N worker processes against threads, in one run.

1. Crop mode: crop files renamed into a watched folder until their rows are stored,
   for threads (`batcher.processes = false`, one per core, the old pipeline) and for
   1..N worker processes; against the physical ceiling measured the same way as in
   bench.daemon_throughput (cores / the per-crop stage costs, each on one thread).
2. Frame mode (1360 x 1024 PNG, about 30 particles): frames/s end to end for the same
   settings, and the frames' own work alone (worker processes preparing frames with no
   inference: what a GPU host, whose inference is off the CPU, would see).
3. Latency at 4 probes x 10 frames/s (crop mode, rename -> stored, p50/p99) with the
   default settings, and the memory (PSS, so pages shared by the processes count once)
   of the daemon's process and all its children after the crop-mode run.

    python -m bench.scaling [--crops 3000] [--frames 60] [--workers 1,2] [--write]

On a GPU host (`--backend tensorrt --batch 64 --workers 1,4,all`) the engine-only row is
TensorRT's on preloaded tensors, the figure end to end is compared with.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from bench import daemon_throughput as throughput
from bench.report import machine_line, replace_section
from monitor.config.settings import load_settings
from monitor.imaging.decode import DEFAULT_LIMITS
from monitor.imaging.preprocess import prepare_batch
from monitor.inference.factory import resolve_backend
from monitor.manifest import load_manifest
from monitor.pipeline.process_pool import FramePreparers
from monitor.simulator import ConstantProfile, CropSimulator, FrameConfig, FrameSimulator
from monitor.sources.folder import read_frame_file


def preparation_only(root: Path, encoded: list[bytes], workers: int) -> float:
    """Frames/s of worker processes preparing frames (decode to tensors), no inference."""
    folder = Path(tempfile.mkdtemp(prefix="prep", dir=root))
    paths = []
    for index, data in enumerate(encoded):
        path = folder / f"frame_{index:04d}.png"
        path.write_bytes(data)
        paths.append(path)
    probes = load_settings(
        data={"probes": [{"id": "R1", "sampling": "particles", "source": {"type": "simulated"}}]}
    ).probes
    spec = load_manifest(throughput.MODEL_DIR).manifest.input
    pool = FramePreparers(workers, probes)
    pool.start()
    threads_per_worker = 2

    def run(share: list[Path]) -> None:
        for path in share:
            read = functools.partial(read_frame_file, str(path), DEFAULT_LIMITS)
            pool.prepare("R1", read, None, spec, with_crop_images=False).release()

    try:
        count = workers * threads_per_worker
        shares = [paths[i::count] for i in range(count)]
        run(paths[:2])  # warm up
        started = time.perf_counter()
        runners = [threading.Thread(target=run, args=(share,)) for share in shares]
        for runner in runners:
            runner.start()
        for runner in runners:
            runner.join()
        return len(paths) / (time.perf_counter() - started)
    finally:
        pool.stop()


def engine_only(crops: list[np.ndarray], batch: int, backend_type: str) -> tuple[float, str]:
    """(crops/s of the backend alone on preloaded tensors, its name)."""
    model = load_manifest(throughput.MODEL_DIR)
    backend = resolve_backend(backend_type, model)
    try:
        tensors = prepare_batch(crops, model.manifest.input)
        backend.infer(tensors[:batch])
        started = time.perf_counter()
        for offset in range(0, len(tensors), batch):
            backend.infer(tensors[offset : offset + batch])
        return len(tensors) / (time.perf_counter() - started), backend.name
    finally:
        backend.close()


def _device(engine_name: str) -> str:
    """The GPU by name (a TensorRT backend's name carries it), else that none was used."""
    if engine_name.startswith("tensorrt"):
        return f"inference on the GPU: {engine_name}"
    return f"no GPU used ({engine_name})"


def _worker_counts(text: str, cores: int) -> list[int]:
    counts = [cores if part.strip() == "all" else int(part) for part in text.split(",")]
    return sorted({1, *counts})  # 1 is what the others are compared with


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=3000)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument(
        "--workers", default="1,all", help="worker process counts, e.g. 1,4,all (all = cores)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backend", default="auto", help="the daemon's backend.type")
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = parser.parse_args()
    throughput.MODEL_DIR = args.model
    throughput.BACKEND = args.backend
    model_name = load_manifest(args.model).manifest.name
    cores = os.cpu_count() or 1
    simulator = CropSimulator(seed=8)
    crops = [simulator.render("PG" if i % 5 == 0 else "CEX") for i in range(200)]
    crops = [crops[i % len(crops)] for i in range(args.crops)]
    encoded = [cv2.imencode(".png", c)[1].tobytes() for c in crops]
    frames = FrameSimulator(FrameConfig(profile=ConstantProfile(0.2)), seed=21)
    frame_files = [
        cv2.imencode(".png", frames.render(float(i))[0])[1].tobytes() for i in range(args.frames)
    ]
    settings: list[tuple[str, dict[str, object]]] = [
        (f"threads ({cores}), one process", {"processes": False, "workers": cores})
    ]
    settings += [
        (f"{n} worker process{'es' if n > 1 else ''}", {"processes": True, "workers": n})
        for n in _worker_counts(args.workers, cores)
    ]
    lines = [
        "| pipeline | crop mode, crops/s | / ceiling | / engine only | PSS all processes | "
        "frame mode, frames/s | / 1 process | frames prepared/s, no inference | / 1 process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stage_ms = throughput.crop_stage_costs(crops[:1000], encoded[:1000], args.batch)
        ceiling = cores * 1000 / sum(stage_ms.values())
        engine, engine_name = engine_only(crops[:1000], args.batch, args.backend)
        results = []
        for name, batcher in settings:
            crop_rate, memory = throughput.files_per_s(root, encoded, "whole", batcher, args.batch)
            frame_rate, _ = throughput.files_per_s(
                root, frame_files, "particles", batcher, args.batch
            )
            workers = int(batcher["workers"])  # type: ignore[call-overload]
            prepared = (
                preparation_only(root, frame_files, workers) if batcher["processes"] else None
            )
            results.append((name, crop_rate, memory, frame_rate, prepared))
            print(name, f"{crop_rate:.0f} crops/s", f"{frame_rate:.1f} frames/s", flush=True)
        latencies = throughput.latency_at_rate(
            root, encoded, probes=4, fps=10.0, seconds=args.latency_seconds
        )
    one = next(r for r in results if r[0] == "1 worker process")
    for name, crop_rate, memory, frame_rate, prepared in results:
        prepared_cells = (
            "| - | - |" if prepared is None else f"| {prepared:.1f} | {prepared / one[4]:.2f} |"
        )
        lines.append(
            f"| {name} | {crop_rate:.0f} | {crop_rate / ceiling:.2f} | {crop_rate / engine:.2f} | "
            f"{memory:.0f} MiB | "
            f"{frame_rate:.1f} | {frame_rate / one[3]:.2f} {prepared_cells}"
        )
    stages = ", ".join(f"{name} {ms:.3f}" for name, ms in stage_ms.items())
    notes = [
        "",
        f"Ceiling: {cores} cores / ({stages} ms per crop, each stage on one thread) = "
        f"{ceiling:.0f} crops/s (inference with ONNX Runtime on one thread). Engine only: "
        f"{engine_name} on preloaded tensors, batch {args.batch}, its default threads: "
        f"{engine:.0f} crops/s.",
        f"Latency rename -> stored at 4 probes x 10 frames/s, default settings: "
        f"p50 {np.percentile(latencies, 50) * 1000:.0f} ms, "
        f"p99 {np.percentile(latencies, 99) * 1000:.0f} ms.",
    ]
    table = "\n".join(lines + notes)
    print(table)
    if args.write:
        command = "python -m bench.scaling " + " ".join(sys.argv[1:])
        body = (
            f"{machine_line()}; {_device(engine_name)}; model `{model_name}`.\n\n"
            f"Command: `{command}`\n\n{table}\n"
        )
        on = ", TensorRT" if engine_name.startswith("tensorrt") else ""
        replace_section(Path("BENCHMARKS.md"), f"scaling: worker processes, {model_name}{on}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
