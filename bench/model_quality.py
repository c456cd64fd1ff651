"""How good is a model where it matters: held-out seed, held-out sites, real crops, non-crystals.

For each model directory: accuracy, macro-F1, PG recall and expected calibration error
on each held-out ImageFolder (through ONNX Runtime and the manifest's preprocessing,
the daemon's path), the seven real reference crops one by one, and the share of the
out-of-distribution set (tests/ood_images.py) and of each held-out set that the model
flags as out of distribution. Prints a table; --write records it in BENCHMARKS.md.

    python -m bench.model_quality --model runs/m1 --model runs/m2 \\
        --set held_out_seed=data/heldout-seed --set held_out_site=data/heldout-sites \\
        --reference ../shared/reference/opencrystaldata-cephalexin --write
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from bench.report import machine_line, replace_section
from model_zoo.imagefolder import list_labelled_files, load_images
from model_zoo.metrics import compute_metrics, expected_calibration_error
from monitor.imaging.preprocess import prepare_batch
from monitor.inference.decision import DecisionRule
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
from monitor.manifest import LoadedModel, load_manifest
from tests.ood_images import build_ood_set


def run_rows(model: LoadedModel, images: list[np.ndarray]) -> np.ndarray:
    backend = OnnxRuntimeBackend(model)
    try:
        return np.concatenate(
            [
                backend.infer(prepare_batch(images[start : start + 128], model.manifest.input))
                for start in range(0, len(images), 128)
            ]
        )
    finally:
        backend.close()


def measure_set(model: LoadedModel, data_dir: Path) -> dict[str, float]:
    classes = model.manifest.classes
    loaded = load_images(list_labelled_files(data_dir, classes), threads=2)
    rule = DecisionRule.from_manifest(model.manifest)
    rows = run_rows(model, loaded.images)
    probabilities = rule.probabilities(rows)
    predicted = probabilities.argmax(axis=1)
    metrics = compute_metrics(loaded.labels, predicted, classes)
    decisions = rule.decide(rows)
    flagged = sum(d.reason == "out_of_distribution" for d in decisions)
    return {
        "images": len(loaded.files),
        "accuracy": metrics.accuracy,
        "macro_f1": metrics.macro_f1,
        "pg_recall": metrics.per_class["PG"].recall if "PG" in metrics.per_class else float("nan"),
        "ece": expected_calibration_error(probabilities, loaded.labels),
        "ood_flagged": flagged / len(decisions),
    }


def measure_ood(model: LoadedModel) -> tuple[float, dict[str, str]]:
    ood_set = build_ood_set()
    decisions = DecisionRule.from_manifest(model.manifest).decide(
        run_rows(model, [item.image for item in ood_set])
    )
    hits = Counter(item.kind for item, d in zip(ood_set, decisions, strict=True)
                   if d.reason == "out_of_distribution")  # fmt: skip
    totals = Counter(item.kind for item in ood_set)
    by_kind = {kind: f"{hits[kind]}/{totals[kind]}" for kind in totals}
    return sum(hits.values()) / len(ood_set), by_kind


def reference_lines(model: LoadedModel, reference: Path) -> list[str]:
    classes = model.manifest.classes
    loaded = load_images(list_labelled_files(reference, classes), threads=2)
    rule = DecisionRule.from_manifest(model.manifest)
    lines = []
    decisions = rule.decide(run_rows(model, loaded.images))
    for item, decision in zip(loaded.files, decisions, strict=True):
        score = "" if decision.ood_score is None else f", OOD score {decision.ood_score:.3f}"
        flag = f" ({decision.reason})" if decision.reason else ""
        mark = "right" if decision.label == classes[item.label] else "WRONG"
        lines.append(
            f"| {item.path.name} | {classes[item.label]} | {decision.label}{flag} | "
            f"{decision.confidence:.3f}{score} | {mark} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", required=True, help="model dir")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=DIR", help="held-out ImageFolder"
    )
    parser.add_argument("--reference", type=Path, help="the real reference crops (CEX/, PG/)")
    parser.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = parser.parse_args()
    sets = dict(item.split("=", 1) for item in args.set)

    command = " ".join(["python -m bench.model_quality", *sys.argv[1:]])
    out = [machine_line(), "", f"Command: `{command}`", ""]
    out.append("| model | set | images | accuracy | macro-F1 | PG recall | ECE | flagged OOD |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    extra: list[str] = []
    for model_dir in args.model:
        model = load_manifest(model_dir)
        name = model.manifest.name
        for set_name, folder in sets.items():
            row = measure_set(model, Path(folder))
            out.append(
                f"| {name} | {set_name} | {row['images']} | {row['accuracy']:.4f} | "
                f"{row['macro_f1']:.4f} | {row['pg_recall']:.4f} | {row['ece']:.4f} | "
                f"{row['ood_flagged']:.2%} |"
            )
            print(out[-1], flush=True)
        if model.manifest.ood is not None:
            rate, by_kind = measure_ood(model)
            extra.append(
                f"- {name}: {rate:.1%} of the out-of-distribution set flagged; by kind "
                + ", ".join(f"{kind} {value}" for kind, value in by_kind.items())
            )
            print(extra[-1], flush=True)
        if args.reference is not None:
            extra.append(f"\n{name} on the real reference crops:\n")
            extra.append("| file | truth | prediction | confidence | |")
            extra.append("|---|---|---|---|---|")
            extra += reference_lines(model, args.reference)
            print("\n".join(extra[-9:]), flush=True)
    body = "\n".join([*out, "", *extra])
    print(body)
    if args.write:
        title = "model quality: held-out sets, real crops, OOD"
        replace_section(Path("BENCHMARKS.md"), title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
