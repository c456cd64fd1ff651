"""Label efficiency on a site no model saw: scratch, ImageNet, SimCLR and SimCLR from ImageNet.

The seed poster's comparison (SimCLR-pretrained ResNet-18 94.55 % on 4,344 microparticle
images, fully supervised 92.45 %, ImageNet-pretrained and fine-tuned 94.13 %), redone on
a plant's problem: one simulated site whose optics and looks no model here was trained
on (a named site style, `monitor.simulator.sites`), its unlabelled crops, and a few of
its labels. For each start:

* scratch: random weights;
* ImageNet: the architecture's local ImageNet weights (`--init imagenet`);
* SimCLR: `pretrain --method simclr` on the site's unlabelled crops from random weights;
* SimCLR from ImageNet: the same pretraining started from the ImageNet weights;

`train` fine-tunes on 1 %, 10 % and 100 % of the site's labelled pool (a stratified
draw; the 1 % share is drawn several times and averaged, as one draw of a handful of
crops is mostly luck) and the best checkpoint is measured on the site's test crops:
accuracy, PG recall, macro-F1. No label outside the share is used: the share is its own
validation set, so checkpoint selection sees only those labels. The frozen encoders'
linear-probe accuracy on the full pool is reported beside them. Prints the tables;
--write records them in BENCHMARKS.md.

    python -m bench.label_efficiency --threads 1 --write
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from bench.report import machine_line, replace_section
from model_zoo.checkpoint import ENCODER_FILE, load_state_dict, save_state_dict
from model_zoo.imagefolder import list_labelled_files, load_images
from model_zoo.linear_probe import run_linear_probe
from model_zoo.metrics import compute_metrics
from model_zoo.pretrain import PretrainOptions, pretrain_model
from model_zoo.registry import create_model, locate_imagenet_weights
from model_zoo.training import TrainOptions, predict_logits, train_model
from monitor.manifest import EvaluationMetrics, InputSpec
from monitor.simulator.crops import CropSimulator
from monitor.simulator.labels import CEX, PG
from monitor.simulator.sites import get_site_style, site_style_names

ARCH = "efficientnet_lite0"  # the one architecture with local ImageNet weights
CLASSES = (CEX, PG)
INITS = ("scratch", "imagenet", "simclr", "simclr-imagenet")
INIT_NAMES = {
    "scratch": "scratch (fully supervised)",
    "imagenet": "ImageNet, fine-tuned",
    "simclr": "SimCLR on the site's crops, from scratch",
    "simclr-imagenet": "SimCLR on the site's crops, from ImageNet",
}
# Fine-tuning epochs per label share: fewer labels, more passes, so every share gets
# enough optimiser steps (1 %: one batch an epoch) without the 100 % runs taking all day.
EPOCHS_PER_SHARE = {1: 60, 10: 30, 100: 6}
SECTION_TITLE = "label efficiency: SimCLR, ImageNet and scratch on an unseen site"


@dataclass(frozen=True)
class Cell:
    accuracy: float
    pg_recall: float
    macro_f1: float


def render_site(work: Path, args: argparse.Namespace) -> None:
    """unlabelled/ (no class folders), pool/<class>/ (the labels) and test/<class>/."""
    marker = work / "rendered.json"
    wanted = {
        "site": args.site,
        "unlabelled": args.unlabelled,
        "labelled": args.labelled,
        "test": args.test,
        "seed": args.seed,
    }
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return
    site = get_site_style(args.site)
    label_rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    for offset, (folder, count) in enumerate(
        (("unlabelled", args.unlabelled), ("pool", args.labelled), ("test", args.test))
    ):
        simulator = CropSimulator(seed=args.seed * 10 + offset, sites=site)
        for index in range(count):
            label = CLASSES[index % 2] if folder != "unlabelled" else CLASSES[label_rng.integers(2)]
            target = work / folder if folder == "unlabelled" else work / folder / label
            target.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target / f"{index:05d}.png"), simulator.render(label))
    marker.write_text(json.dumps(wanted))
    print(f"rendered the {args.site} site in {time.perf_counter() - started:.0f} s", flush=True)


def draw_share(work: Path, share: int, draw: int, seed: int) -> Path:
    """A split-folder data set: train/ = val/ = a stratified `share` % of the pool."""
    folder = work / "shares" / f"{share}pct-draw{draw}"
    if folder.exists():
        return folder
    rng = np.random.default_rng((seed, share, draw))
    for label in CLASSES:
        files = sorted((work / "pool" / label).iterdir())
        count = max(2, round(len(files) * share / 100))
        chosen = [files[i] for i in sorted(rng.choice(len(files), count, replace=False))]
        for split in ("train", "val"):
            (folder / split / label).mkdir(parents=True, exist_ok=True)
            for path in chosen:
                os.symlink(path.resolve(), folder / split / label / path.name)
    return folder


def pretrain_encoders(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """SimCLR from scratch and from ImageNet on the unlabelled crops; finished runs are
    reused, interrupted ones resume."""
    runs = {}
    for name, init in (("simclr", "scratch"), ("simclr-imagenet", "imagenet")):
        run = work / "pretrain" / name
        runs[name] = run
        if (run / ENCODER_FILE).exists():
            recorded = json.loads((run / "args.json").read_text())
            if recorded["epochs"] == args.pretrain_epochs and recorded["init"] == init:
                continue
        started = time.perf_counter()
        pretrain_model(
            PretrainOptions(
                data_dir=work / "unlabelled",
                out_dir=run,
                arch=ARCH,
                init=init,  # type: ignore[arg-type]
                input_size=args.input_size,
                epochs=args.pretrain_epochs,
                batch_size=args.pretrain_batch,
                temperature=args.temperature,
                seed=args.seed,
                threads=args.threads,
                overwrite=(run / ENCODER_FILE).exists(),
                command=f"bench.label_efficiency ({name})",
            )
        )
        print(f"pretrained {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return runs


def scratch_weights(work: Path, seed: int) -> Path:
    """The random start as a file, so the linear probe can read it like the others."""
    path = work / "init" / "scratch.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        save_state_dict(create_model(ARCH, len(CLASSES)).state_dict(), path)
    return path


def fine_tune(
    work: Path, data: Path, init: str | Path, *, name: str, epochs: int, args: argparse.Namespace
) -> Path:
    run = work / "runs" / name
    if (run / "evaluation.json").exists():
        return run
    train_model(
        TrainOptions(
            data_dir=data,
            out_dir=run,
            arch=ARCH,
            input_size=args.input_size,
            epochs=epochs,
            patience=epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            init=init,  # type: ignore[arg-type]
            threads=args.threads,
            layout="split-folders",
            overwrite=True,
            command=f"bench.label_efficiency ({name})",
        )
    )
    return run


def measure(run: Path, test_images: list[np.ndarray], test_labels: np.ndarray) -> Cell:
    recorded = json.loads((run / "args.json").read_text())
    spec = InputSpec.model_validate(recorded["input"])
    model = create_model(ARCH, len(CLASSES))
    model.load_state_dict(load_state_dict(run / "checkpoint.pt"))
    logits = predict_logits(model, test_images, spec, 128, torch.device("cpu"))
    return cell(compute_metrics(test_labels, logits.argmax(1).numpy(), CLASSES))


def cell(metrics: EvaluationMetrics) -> Cell:
    return Cell(metrics.accuracy, metrics.per_class[PG].recall, metrics.macro_f1)


def mean_cell(cells: list[Cell]) -> Cell:
    return Cell(
        float(np.mean([c.accuracy for c in cells])),
        float(np.mean([c.pg_recall for c in cells])),
        float(np.mean([c.macro_f1 for c in cells])),
    )


def table(
    title: str, key: str, results: dict[str, dict[int, list[Cell]]], probes: dict[str, Cell]
) -> list[str]:
    """Rows = start, columns = label share (the seed poster's form), then the probe."""
    shares = sorted(next(iter(results.values())))
    percent = key != "macro_f1"

    def show(value: float, digits: int) -> str:
        return f"{value * 100:.{digits}f} %" if percent else f"{value:.{digits + 2}f}"

    lines = [
        f"{title}:",
        "",
        "| start | " + " | ".join(f"{share} % of labels" for share in shares) + " | "
        "linear probe, 100 % |",
        "|---|" + "---:|" * (len(shares) + 1),
    ]
    for init, by_share in results.items():
        values = []
        for share in shares:
            cells = by_share[share]
            text = show(getattr(mean_cell(cells), key), 2)
            if len(cells) > 1:
                low = min(getattr(c, key) for c in cells)
                high = max(getattr(c, key) for c in cells)
                text += f" ({show(low, 1)} - {show(high, 1)})"
            values.append(text)
        probe = show(getattr(probes[init], key), 2) if init in probes else "-"
        lines.append(f"| {INIT_NAMES[init]} | " + " | ".join(values) + f" | {probe} |")
    return lines


def verdict(results: dict[str, dict[int, list[Cell]]], test_images: int) -> str:
    """Where SimCLR helps, and where not, from the measured accuracies.

    A difference counts only beyond two standard errors of the difference of two
    accuracies measured on the same number of test crops (binomial, at their mean).
    """
    parts = []
    for simclr, base in (("simclr", "scratch"), ("simclr-imagenet", "imagenet")):
        helps, hurts, level = [], [], []
        for share, cells in results[simclr].items():
            ours = mean_cell(cells).accuracy
            theirs = mean_cell(results[base][share]).accuracy
            p = (ours + theirs) / 2
            noise = 2 * math.sqrt(2 * p * (1 - p) / test_images)
            text = f"{share} % ({(ours - theirs) * 100:+.1f} points)"
            bucket = helps if ours - theirs > noise else hurts if theirs - ours > noise else level
            bucket.append(text)
        said = [
            f"{what} at {', '.join(shares)}"
            for what, shares in (
                ("better", helps),
                ("worse", hurts),
                ("no difference beyond the noise", level),
            )
            if shares
        ]
        parts.append(f"{INIT_NAMES[simclr]} against {INIT_NAMES[base]}: {'; '.join(said)}.")
    return " ".join(parts)


def run_seconds(runs: list[Path]) -> float:
    """Compute time the runs recorded (their epochs' seconds), cached or not."""
    total = 0.0
    for run in runs:
        with (run / "metrics.csv").open() as stream:
            total += sum(float(row["seconds"]) for row in csv.DictReader(stream))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--site", default="hazy-jpeg", choices=site_style_names(), help="held-out site style"
    )
    parser.add_argument("--unlabelled", type=int, default=1200, help="unlabelled site crops")
    parser.add_argument("--labelled", type=int, default=600, help="labelled pool (100 %%)")
    parser.add_argument("--test", type=int, default=800, help="labelled test crops")
    parser.add_argument(
        "--shares",
        default=",".join(f"{share}:{epochs}" for share, epochs in EPOCHS_PER_SHARE.items()),
        help="label shares in percent, each with its fine-tuning epochs",
    )
    parser.add_argument("--draws", type=int, default=3, help="draws of the smallest share")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch")
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--pretrain-batch", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/label-efficiency"))
    parser.add_argument("--write", action="store_true", help="record the tables in BENCHMARKS.md")
    args = parser.parse_args()
    try:
        epochs_per_share = {
            int(share): int(epochs)
            for share, epochs in (item.split(":") for item in args.shares.split(","))
        }
    except ValueError:
        parser.error("--shares: SHARE:EPOCHS,... such as 1:60,10:30,100:6")
    shares = sorted(epochs_per_share)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)

    render_site(work, args)
    test = load_images(list_labelled_files(work / "test", CLASSES), threads=2)
    encoders = pretrain_encoders(work, args)
    fine_tuned: list[Path] = []
    starts: dict[str, str | Path] = {
        "scratch": "scratch",
        "imagenet": "imagenet",
        "simclr": encoders["simclr"],
        "simclr-imagenet": encoders["simclr-imagenet"],
    }
    results: dict[str, dict[int, list[Cell]]] = {init: {} for init in INITS}
    for share in shares:
        draws = args.draws if share == min(shares) else 1
        for draw in range(draws):
            data = draw_share(work, share, draw, args.seed)
            for init in INITS:
                name = f"{init}-{share}pct-draw{draw}"
                epochs = epochs_per_share[share]
                run = fine_tune(work, data, starts[init], name=name, epochs=epochs, args=args)
                fine_tuned.append(run)
                result = measure(run, test.images, test.labels)
                results[init].setdefault(share, []).append(result)
                print(
                    f"{name}: accuracy {result.accuracy:.4f}, PG recall {result.pg_recall:.4f}, "
                    f"macro-F1 {result.macro_f1:.4f}",
                    flush=True,
                )

    probe_data = work / "probe"
    if not probe_data.exists():
        probe_data.mkdir()
        for split, source in (("train", "pool"), ("val", "test")):
            os.symlink((work / source).resolve(), probe_data / split, target_is_directory=True)
    probes: dict[str, Cell] = {}
    probe_sources: dict[str, Path] = {
        "scratch": scratch_weights(work, args.seed),
        "imagenet": locate_imagenet_weights(ARCH),
        "simclr": encoders["simclr"],
        "simclr-imagenet": encoders["simclr-imagenet"],
    }
    for init, weights in probe_sources.items():
        report = run_linear_probe(
            weights,
            probe_data,
            arch=ARCH,
            input_size=args.input_size,
            layout="split-folders",
            threads=args.threads,
        )
        probes[init] = cell(report.evaluations["validation"])
        print(f"linear probe {init}: accuracy {probes[init].accuracy:.4f}", flush=True)

    minutes = (time.perf_counter() - started) / 60
    command = " ".join(["python -m bench.label_efficiency", *sys.argv[1:]])
    final_losses = {
        name: (run / "metrics.csv").read_text().strip().splitlines()[-1].split(",")[1]
        for name, run in encoders.items()
    }
    (work / "results.json").write_text(
        json.dumps(
            {
                "fine_tuned": {
                    init: {share: [c.__dict__ for c in cells] for share, cells in by.items()}
                    for init, by in results.items()
                },
                "linear_probe": {init: c.__dict__ for init, c in probes.items()},
            },
            indent=2,
        )
    )
    out = [
        machine_line() + f"; torch on {args.threads} thread(s) while other jobs shared the "
        f"machine; epochs' compute {run_seconds(list(encoders.values())) / 60:.0f} min "
        f"pretraining and {run_seconds(fine_tuned) / 60:.0f} min fine-tuning "
        f"(this invocation {minutes:.0f} min; finished runs under --work are reused)",
        "",
        f"Command: `{command}`",
        "",
        f"Site `{args.site}` (a named site style no model here was trained on), {ARCH} at "
        f"{args.input_size} px. {args.unlabelled} unlabelled crops for SimCLR "
        f"({args.pretrain_epochs} epochs, batch {args.pretrain_batch}, temperature "
        f"{args.temperature}, AdamW 1e-3 with a cosine schedule; final NT-Xent loss "
        + ", ".join(f"{name} {loss}" for name, loss in final_losses.items())
        + f"); a labelled pool of {args.labelled} crops (100 %) and {args.test} test crops, "
        "both half CEX, half PG. Fine-tuning: `train` with its defaults (AdamW 1e-3, cosine, "
        "augmentation), batch "
        f"{args.batch_size}, "
        + ", ".join(f"{epochs_per_share[share]} epochs at {share} %" for share in shares)
        + "; the share is its own validation set (no other label is used). "
        f"The {min(shares)} % column is the mean of {args.draws} draws of the share "
        "(lowest-highest draw in brackets). Linear probe: logistic regression on the frozen "
        "encoder's features of the whole pool, measured on the test crops.",
        "",
    ]
    for title, key in (
        ("Accuracy", "accuracy"),
        ("PG recall", "pg_recall"),
        ("Macro-F1", "macro_f1"),
    ):
        out += table(title, key, results, probes)
        out.append("")
    out.append(
        "Where SimCLR helps and where it does not (accuracy, mean over draws; a difference "
        f"within two standard errors of {args.test} test crops counts as none): "
        + verdict(results, args.test)
    )
    body = "\n".join(out)
    print(body)
    if args.write:
        replace_section(Path("BENCHMARKS.md"), SECTION_TITLE, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
