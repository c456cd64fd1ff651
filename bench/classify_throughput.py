"""Batched classify (ONNX Runtime) against one-file-at-a-time torch eager, same model, same files.

Both arms decode and preprocess every file with the same code (monitor.imaging.decode and
monitor.imaging.preprocess); only the way the network runs differs. Prints a table and, with
--write, records it in BENCHMARKS.md.

    python -m bench.classify_throughput --run runs/default-mnv3s --files data/test-crops
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import machine_line, replace_section
from model_zoo.checkpoint import load_state_dict
from model_zoo.registry import create_model
from monitor.cli.classify import classify_files, collect_image_files
from monitor.imaging.decode import read_image_file
from monitor.imaging.preprocess import prepare_image
from monitor.inference.factory import resolve_backend
from monitor.manifest import default_model_dir, load_manifest


def eager_one_at_a_time(files: list[Path], run_dir: Path, spec) -> float:  # type: ignore[no-untyped-def]
    args = json.loads((run_dir / "args.json").read_text())
    model = create_model(args["arch"], len(args["classes"]))
    model.load_state_dict(load_state_dict(run_dir / "checkpoint.pt"))
    model.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            tensor = torch.from_numpy(prepare_image(read_image_file(path), spec))[None]
            torch.softmax(model(tensor), dim=1)
    return time.perf_counter() - started


def batched_onnxruntime(files: list[Path], model_dir: Path, batch_size: int) -> float:
    model = load_manifest(model_dir)
    backend = resolve_backend("onnxruntime", model)
    started = time.perf_counter()
    results = list(classify_files(files, model, backend, batch_size=batch_size))
    elapsed = time.perf_counter() - started
    assert all(r.status != "error" for r in results)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="training run with checkpoint.pt")
    parser.add_argument("--model", type=Path, default=None, help="exported model of that run")
    parser.add_argument("--files", type=Path, required=True, help="folder of crops")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    files = list(collect_image_files([args.files]))[: args.count]
    model_dir = args.model or default_model_dir()
    spec = load_manifest(model_dir).manifest.input
    # Warm both paths on a few files first so neither pays one-off start-up costs.
    eager_one_at_a_time(files[:10], args.run, spec)
    batched_onnxruntime(files[:10], model_dir, args.batch_size)
    eager_s = eager_one_at_a_time(files, args.run, spec)
    batched_s = batched_onnxruntime(files, model_dir, args.batch_size)
    rows = [
        ("torch eager, one file at a time", len(files) / eager_s),
        (f"classify, ONNX Runtime, batch {args.batch_size}", len(files) / batched_s),
    ]
    ratio = rows[1][1] / rows[0][1]
    table = ["| path | images/s |", "|---|---:|"]
    table += [f"| {name} | {rate:.0f} |" for name, rate in rows]
    table.append(f"| **speed-up** | **{ratio:.1f}x** |")
    text = "\n".join(table)
    print(text)
    if args.write:
        command = "python -m bench.classify_throughput " + " ".join(sys.argv[1:])
        body = (
            f"{machine_line()}; {len(files)} files of `{args.files}`, decode and preprocessing "
            f"included in both arms; Python {platform.python_version()}, torch "
            f"{torch.__version__}.\n\nCommand: `{command}`\n\n{text}\n"
        )
        replace_section(Path("BENCHMARKS.md"), "classify: batched vs one at a time", body)
    return 0 if ratio >= 1 else 1


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
