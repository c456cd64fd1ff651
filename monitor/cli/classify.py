"""`crystal-monitor classify`: classify image files with an exported model.

Decoding of the next batch runs in a thread pool while the backend works on the
current one (OpenCV and ONNX Runtime both release the GIL), and inference is batched;
bad files are reported with a reason and never stop the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np

from monitor.imaging.decode import (
    DEFAULT_LIMITS,
    IMAGE_SUFFIXES,
    DecodeError,
    DecodeLimits,
    read_image_file,
)
from monitor.imaging.preprocess import prepare_image
from monitor.inference.backend import Backend
from monitor.inference.decision import DecisionRule, Reason
from monitor.inference.factory import resolve_backend
from monitor.manifest import LoadedModel, ManifestError, load_manifest

EXIT_OK = 0
EXIT_SOME_FAILED = 2
EXIT_USAGE = 64


@dataclass(frozen=True)
class FileResult:
    """The outcome for one input file, as printed by `classify --json`."""

    path: str
    label: str | None
    confidence: float | None
    probabilities: dict[str, float] | None
    status: Literal["ok", "uncertain", "error"]
    error: str | None
    reason: Reason | None = None
    """Why the result is uncertain: low_confidence or out_of_distribution; None when ok."""
    ood_score: float | None = None
    """The model's out-of-distribution score (None for a model without one)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "label": self.label,
            "confidence": self.confidence,
            "probabilities": self.probabilities,
            "status": self.status,
            "reason": self.reason,
            "ood_score": self.ood_score,
            "error": self.error,
        }


def collect_image_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named directly are always tried; folders contribute their image files.

    os.walk does not follow symbolic links to folders, so a link loop cannot trap it.
    """
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    candidate = Path(root) / name
                    if candidate.suffix.lower() in IMAGE_SUFFIXES:
                        yield candidate
        else:
            yield path


def _load(path: Path, model: LoadedModel, limits: DecodeLimits) -> np.ndarray | str:
    """A prepared input tensor, or the reason the file could not be used."""
    try:
        return prepare_image(read_image_file(path, limits), model.manifest.input)
    except DecodeError as exc:
        return str(exc)


def classify_files(
    files: Sequence[Path],
    model: LoadedModel,
    backend: Backend,
    *,
    batch_size: int = 64,
    limits: DecodeLimits = DEFAULT_LIMITS,
    decode_threads: int = 2,
) -> Iterator[FileResult]:
    """Yield one FileResult per file, in input order."""
    manifest = model.manifest
    rule = DecisionRule.from_manifest(manifest)
    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, decode_threads)) as pool:

        def submit(chunk: Sequence[Path]) -> list[Future[np.ndarray | str]]:
            return [pool.submit(_load, path, model, limits) for path in chunk]

        pending = submit(chunks[0]) if chunks else []
        for index, chunk in enumerate(chunks):
            loaded = [future.result() for future in pending]
            pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
            tensors = [item for item in loaded if isinstance(item, np.ndarray)]
            decisions = []
            probabilities = np.empty((0, len(manifest.classes)), dtype=np.float32)
            if tensors:
                rows = backend.infer(np.stack(tensors))
                decisions = rule.decide(rows)
                probabilities = rule.probabilities(rows)
            row = 0
            for path, item in zip(chunk, loaded, strict=True):
                if isinstance(item, str):
                    yield FileResult(str(path), None, None, None, "error", item)
                    continue
                decision = decisions[row]
                yield FileResult(
                    path=str(path),
                    label=decision.label,
                    confidence=round(decision.confidence, 6),
                    probabilities={
                        name: round(float(p), 6)
                        for name, p in zip(manifest.classes, probabilities[row], strict=True)
                    },
                    status=decision.status,
                    error=None,
                    reason=decision.reason,
                    ood_score=None if decision.ood_score is None else round(decision.ood_score, 4),
                )
                row += 1


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders (recursive)")
    parser.add_argument(
        "--model", type=Path, default=None, help="exported model directory (default: shipped model)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per file and line")
    parser.add_argument("--batch-size", type=int, default=64, help="images per inference batch")
    parser.add_argument(
        "--max-pixels", type=int, default=50_000_000, help="refuse larger images before decoding"
    )


def print_table(results: Iterable[FileResult], out: TextIO) -> None:
    for result in results:
        if result.status == "error":
            out.write(f"{result.path}\terror\t{result.error}\n")
        else:
            flag = "" if result.status == "ok" else f"\t(uncertain: {result.reason})"
            out.write(f"{result.path}\t{result.label}\t{result.confidence:.3f}{flag}\n")


def run_classify(args: argparse.Namespace) -> int:
    try:
        model = load_manifest(args.model)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    files = list(collect_image_files(args.paths))
    backend = resolve_backend("onnxruntime", model)
    failed = 0
    try:
        for result in classify_files(
            files,
            model,
            backend,
            batch_size=args.batch_size,
            limits=DecodeLimits(max_pixels=args.max_pixels),
        ):
            failed += result.status == "error"
            if args.json:
                sys.stdout.write(json.dumps(result.to_json()) + "\n")
            else:
                print_table([result], sys.stdout)
    finally:
        backend.close()
    if not args.json:
        print(f"{len(files) - failed} classified, {failed} failed", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK
