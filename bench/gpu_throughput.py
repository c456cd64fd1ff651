"""TensorRT on a GPU host: the engine alone against the daemon's pipeline end to end.

For each batch size from 1 to 256 (powers of two):

- engine only: preprocessed tensors already in memory, submitted back to back with one
  batch in flight (what the GPU can do);
- end to end: PNG crops held in memory, decoded and preprocessed by worker threads with
  the daemon's own code (monitor.imaging.decode, monitor.imaging.preprocess), packed by the daemon's
  MicroBatcher (max_batch = the batch size) and run on the same backend, until every
  crop's probabilities are back (what the daemon can do, without file system and store).

One engine serves every row: batch profile 1 to 256, as the daemon builds it for
batcher.max_batch = 256. Prints a table; --write records it in BENCHMARKS.md. Needs a
CUDA GPU with TensorRT 10 (`make bench-gpu`); elsewhere it says why and exits 2.
`--backend onnxruntime` measures ONNX Runtime the same way, to check the script itself on
a machine without a GPU.

    python -m bench.gpu_throughput [--crops 8192] [--workers N] [--precision fp16] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from bench.report import machine_line, replace_section
from monitor.config.settings import TensorRTConfig
from monitor.imaging.decode import decode_image
from monitor.imaging.preprocess import prepare_batch
from monitor.inference.backend import Backend, PipelinedBackend
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
from monitor.inference.tensorrt_backend import create_tensorrt_backend, probe_tensorrt
from monitor.manifest import InputSpec, load_manifest
from monitor.pipeline.batcher import MicroBatcher
from monitor.simulator import LABELS, CropSimulator

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CROPS_PER_FRAME = 30  # a dense frame's particles reach the batcher together
MIN_ENGINE_SECONDS = 2.0


def make_crops(count: int, seed: int = 3) -> list[np.ndarray]:
    simulator = CropSimulator(seed)
    return [simulator.render(LABELS[i % 2]) for i in range(count)]


def engine_only(backend: Backend, tensors: np.ndarray, batch: int) -> float:
    """Crops/s on preloaded tensors, one batch in flight when the backend allows it."""
    pieces = [tensors[i : i + batch] for i in range(0, len(tensors) - batch + 1, batch)]
    backend.infer(pieces[0])  # warm this shape
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < MIN_ENGINE_SECONDS:
        if isinstance(backend, PipelinedBackend):
            in_flight = None
            for piece in pieces:
                submitted = backend.submit(piece)
                if in_flight is not None:
                    in_flight.wait()
                in_flight = submitted
            assert in_flight is not None
            in_flight.wait()
        else:
            for piece in pieces:
                backend.infer(piece)
        done += batch * len(pieces)
    return done / (time.perf_counter() - started)


def end_to_end(
    backend: Backend, encoded: list[bytes], spec: InputSpec, batch: int, workers: int
) -> float:
    """Crops/s from PNG bytes to probabilities through workers and the MicroBatcher."""
    batcher = MicroBatcher(
        backend, max_batch=batch, max_wait_s=0.005, queue_crops=max(1024, 4 * batch)
    )
    lock = threading.Lock()
    remaining = [len(encoded)]
    errors: list[str] = []
    finished = threading.Event()

    def on_done(count: int) -> Callable[[np.ndarray | None, str | None], None]:
        def record(rows: np.ndarray | None, error: str | None) -> None:
            with lock:
                if error is not None:
                    errors.append(error)
                remaining[0] -= count
                if remaining[0] == 0:
                    finished.set()

        return record

    def work(frame: list[bytes]) -> None:
        tensors = prepare_batch([decode_image(data) for data in frame], spec)
        batcher.submit(tensors, on_done(len(frame)))

    frames = [encoded[i : i + CROPS_PER_FRAME] for i in range(0, len(encoded), CROPS_PER_FRAME)]
    batcher.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(work, frames))
    if not finished.wait(600):
        raise RuntimeError("the pipeline did not finish within 600 s")
    elapsed = time.perf_counter() - started
    batcher.stop()
    if errors:
        raise RuntimeError(f"inference failed: {errors[0]}")
    return len(encoded) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["tensorrt", "onnxruntime"], default="tensorrt")
    parser.add_argument("--model", type=Path, default=None, help="model directory (shipped)")
    parser.add_argument("--precision", choices=["fp16", "int8"], default="fp16")
    parser.add_argument("--calibration", type=Path, default=None, help="crops for int8")
    parser.add_argument("--crops", type=int, default=8192, help="crops for the end-to-end runs")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode threads")
    parser.add_argument("--cache-dir", type=Path, default=None, help="engine cache (temporary)")
    parser.add_argument("--max-batch", type=int, default=max(BATCH_SIZES), help="largest batch")
    parser.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = parser.parse_args()
    sizes = [size for size in BATCH_SIZES if size <= args.max_batch]
    model = load_manifest(args.model)
    spec = model.manifest.input

    device = "CPU"
    if args.backend == "tensorrt":
        availability = probe_tensorrt()
        if not availability.available:
            print(
                f"TensorRT cannot run on this host: {availability.reason}.\n"
                "Run this benchmark on a GPU host (`make bench-gpu`); "
                "`--backend onnxruntime` exercises the script on CPU.",
                file=sys.stderr,
            )
            return 2
        device = f"{availability.gpu_name}, {availability.reason}"
        cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="crystal-monitor-engines-"))
        settings = TensorRTConfig(precision=args.precision, calibration_dir=args.calibration)
        backend: Backend = create_tensorrt_backend(
            model, settings, max_batch=max(sizes), cache_dir=cache_dir, availability=availability
        )
    else:
        backend = OnnxRuntimeBackend(model)
        device = "no GPU used"

    crops = make_crops(max(args.crops, 2 * max(sizes)))
    tensors = prepare_batch(crops[: 2 * max(sizes)], spec)
    encoded = [cv2.imencode(".png", crop)[1].tobytes() for crop in crops[: args.crops]]
    rows = []
    try:
        for size in sizes:
            engine = engine_only(backend, tensors, size)
            pipeline = end_to_end(backend, encoded, spec, size, args.workers)
            rows.append((size, engine, pipeline))
            print(f"batch {size:>3}: engine {engine:9.0f} crops/s, end to end {pipeline:8.0f}")
    finally:
        backend.close()

    table = [
        "| batch | engine only, crops/s | end to end, crops/s | end to end / engine |",
        "|---:|---:|---:|---:|",
    ]
    table += [f"| {s} | {e:.0f} | {p:.0f} | {p / e:.2f} |" for s, e, p in rows]
    text = "\n".join(table)
    print(text)
    if args.write:
        command = "python -m bench.gpu_throughput " + " ".join(sys.argv[1:])
        body = (
            f"{machine_line()}; {device}; model `{model.manifest.name}`, backend "
            f"`{backend.name}`; end to end = {len(encoded)} PNG crops decoded and preprocessed "
            f"by {args.workers} worker threads, {CROPS_PER_FRAME} per frame, through the "
            f"MicroBatcher.\n\nCommand: `{command}`\n\n{text}\n"
        )
        title = f"gpu_throughput: {backend.name}, engine only vs end to end"
        replace_section(Path("BENCHMARKS.md"), title, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
