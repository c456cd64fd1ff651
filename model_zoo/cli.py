"""`python -m model_zoo {pretrain,train,export,evaluate}`: the model zoo's command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from model_zoo.errors import ModelZooError
from model_zoo.evaluation import (
    CALIBRATION_BINS,
    PER_FILE_LIMIT,
    EvaluationReport,
    evaluate_model_dirs,
)
from model_zoo.export import (
    DEFAULT_MIN_CLASS_RECALL,
    DEFAULT_MIN_MACRO_F1,
    DEFAULT_OPSET,
    export_model,
)
from model_zoo.imagefolder import DEFAULT_FRACTIONS
from model_zoo.linear_probe import LINEAR_PROBE_FILE, LinearProbeReport, run_linear_probe
from model_zoo.metrics import format_metrics_table
from model_zoo.ood import DEFAULT_FALSE_REJECT_RATE
from model_zoo.pretrain import PretrainOptions, pretrain_model
from model_zoo.registry import list_imagenet_models, list_models
from model_zoo.training import TrainOptions, train_model
from monitor.manifest import ManifestError

DESCRIPTION = """\
Train, export and evaluate crystal classifiers.

  pretrain  FOLDER of unlabelled crops -> RUN_DIR/encoder.pt (SimCLR, self-supervised)
  train     DATA_DIR (one folder per class, or train/ val/ [test/] folders) -> RUN_DIR
            (--init RUN_DIR fine-tunes a pretrain run's encoder)
  export    RUN_DIR -> MODEL_DIR (model.onnx + manifest.json, checked against ONNX Runtime)
  evaluate  MODEL_DIR on any class-folder DATA_DIR, through ONNX Runtime
            (--linear-probe RUN_DIR DATA_DIR: a frozen encoder's linear-probe accuracy)
  train-detector  OUT_DIR: the particle detector of separation = "learned", trained on
            simulated frames (detector.onnx + detector.json)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_zoo",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_pretrain_parser(commands)
    _add_train_parser(commands)
    _add_export_parser(commands)
    _add_evaluate_parser(commands)
    _add_train_detector_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; user errors print one line and return 1 instead of a traceback."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parsed = build_parser().parse_args(arguments)
    command = shlex.join(["python", "-m", "model_zoo", *arguments])
    try:
        if parsed.command == "pretrain":
            return _run_pretrain(parsed, command)
        if parsed.command == "train":
            return _run_train(parsed, command)
        if parsed.command == "export":
            return _run_export(parsed)
        if parsed.command == "train-detector":
            return _run_train_detector(parsed, command)
        if parsed.linear_probe:
            return _run_linear_probe(parsed)
        return _run_evaluate(parsed)
    except (ModelZooError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _add_pretrain_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain an encoder on unlabelled crops (SimCLR), for train --init",
        description="Self-supervised pretraining (SimCLR): two random views of every image "
        "under FOLDER (random resized crop, rotation, flips, blur, brightness/contrast, "
        "noise) through the network and an MLP projection head, NT-Xent loss against the "
        "other views of the batch (no memory bank), AdamW with a cosine schedule. FOLDER is "
        "searched recursively (png, jpg, tif, bmp; 8 or 16 bit); class folders such as a "
        "`crystal-monitor samples export` are read as unlabelled. Writes args.json (with "
        "the input normalisation), metrics.csv, checkpoint.pt after every epoch, and at "
        "the end encoder.pt: the network without its classifier head, for "
        "`python -m model_zoo train DATA_DIR --init RUN_DIR --arch ARCH`. The same "
        "command on an unfinished RUN_DIR resumes it after its last finished epoch.",
        formatter_class=_DefaultsHelpFormatter,
    )
    pretrain.add_argument(
        "data_dir", type=Path, metavar="FOLDER", help="images, searched recursively"
    )
    pretrain.add_argument(
        "--out", type=Path, required=True, metavar="RUN_DIR", help="run directory to write"
    )
    pretrain.add_argument(
        "--method", choices=("simclr",), default="simclr", help="self-supervised method"
    )
    pretrain.add_argument(
        "--arch",
        default="efficientnet_lite0",
        choices=list_models(),
        help="network architecture; train --init RUN_DIR must use the same",
    )
    pretrain.add_argument(
        "--init",
        choices=("scratch", "imagenet"),
        default=None,
        help="start from random weights or the architecture's local ImageNet weights "
        f"({', '.join(list_imagenet_models())}). Default: imagenet where there are some, "
        "else scratch",
    )
    pretrain.add_argument("--input-size", type=int, default=96, help="side of the input, px")
    pretrain.add_argument(
        "--resize",
        choices=("letterbox", "stretch"),
        default="letterbox",
        help="how a view becomes the square input (as train's --resize)",
    )
    pretrain.add_argument("--epochs", type=int, default=30, help="epochs")
    pretrain.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="crops per step; each gives two views, and the other 2N-2 views are its "
        "negatives, so larger is better while memory lasts",
    )
    pretrain.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    pretrain.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    pretrain.add_argument(
        "--temperature",
        type=float,
        default=0.5,
        help="NT-Xent temperature. 0.5, not SimCLR's ImageNet 0.1: a low temperature "
        "pushes the hardest negatives apart most, and in a batch of particle crops those "
        "are crops of the same class, so it fights the class structure; SimCLR's small-"
        "batch runs also did best at 0.5",
    )
    pretrain.add_argument(
        "--projection-dim", type=int, default=128, help="output width of the projection head"
    )
    pretrain.add_argument("--seed", type=int, default=0, help="seeds the init, views and order")
    pretrain.add_argument(
        "--workers", type=int, default=0, help="DataLoader worker processes (0: main process)"
    )
    pretrain.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    pretrain.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pretrain.add_argument(
        "--resume",
        action="store_true",
        help="insist on resuming: fail unless RUN_DIR holds an unfinished run with these "
        "arguments (without it such a run is resumed too, and an empty RUN_DIR started)",
    )
    pretrain.add_argument(
        "--overwrite", action="store_true", help="replace the files of an earlier run in RUN_DIR"
    )


def _add_train_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = commands.add_parser(
        "train",
        help="train a classifier on an ImageFolder",
        description="Train a classifier. DATA_DIR holds one folder per class (split here, "
        "stratified 70/25/5 by default) or train/, val/ and optionally test/ folders of class "
        "folders (used as given). Writes args.json, splits.json, metrics.csv, checkpoint.pt, "
        "evaluation.json and PNG plots into RUN_DIR.",
        formatter_class=_DefaultsHelpFormatter,
    )
    train.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="ImageFolder root")
    train.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="RUN_DIR",
        help="run directory to write (required; created if missing)",
    )
    train.add_argument(
        "--arch",
        default="efficientnet_lite0",
        choices=list_models(),
        help="network architecture (the shipped model's, chosen by its held-out-site figure)",
    )
    train.add_argument("--input-size", type=int, default=96, help="side of the square input, px")
    train.add_argument(
        "--resize",
        choices=("letterbox", "stretch"),
        default="letterbox",
        help="letterbox keeps the aspect ratio; stretch fills the square",
    )
    train.add_argument("--epochs", type=int, default=30, help="maximum epochs")
    train.add_argument("--batch-size", type=int, default=64, help="training images per step")
    train.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    train.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    train.add_argument(
        "--schedule",
        choices=("cosine", "onecycle"),
        default="cosine",
        help="learning-rate schedule, stepped per batch",
    )
    train.add_argument(
        "--patience",
        type=int,
        default=8,
        help="stop after this many epochs without a better validation macro-F1",
    )
    train.add_argument("--seed", type=int, default=0, help="seeds the split, init and augmentation")
    train.add_argument(
        "--init",
        type=_parse_init,
        default=None,
        metavar="{scratch,imagenet,PATH}",
        help="initial weights: scratch (random); imagenet (from an installed package, "
        f"for {', '.join(list_imagenet_models())}); or PATH: a pretrain run directory "
        "(its encoder.pt), a train run directory (its checkpoint.pt) or a local state_dict "
        "file, whose tensors of another shape (e.g. another head size) are skipped and "
        "listed. A run's --arch must be this --arch, and its recorded input normalisation "
        "is used. Default: imagenet for an architecture with local ImageNet weights, else "
        "scratch; the choice is printed and recorded in args.json",
    )
    train.add_argument(
        "--init-weights",
        type=Path,
        metavar="FILE",
        default=None,
        help="the same as --init FILE",
    )
    train.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader worker processes for augmentation (0: main process)",
    )
    train.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    train.add_argument(
        "--uncertainty-threshold",
        type=float,
        default=0.6,
        help="top probability below which a particle counts as uncertain; saved for export",
    )
    train.add_argument(
        "--balance",
        choices=("weighted-sampler", "loss-weights", "none"),
        default="loss-weights",
        help="class-imbalance handling",
    )
    train.add_argument(
        "--layout",
        choices=("auto", "class-folders", "split-folders"),
        default="auto",
        help="auto: split folders when DATA_DIR has train/ and val/",
    )
    train.add_argument(
        "--split",
        type=_parse_split,
        default=",".join(f"{fraction * 100:g}" for fraction in DEFAULT_FRACTIONS),
        metavar="TRAIN,VAL,TEST",
        help="split percentages for a class-folder layout",
    )
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="train without augmentation (default: augment with rotation, flips, scale, "
        "brightness/contrast, blur and noise)",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace the files of an earlier run in RUN_DIR"
    )


def _add_export_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser(
        "export",
        help="export a run's best checkpoint to model.onnx + manifest.json",
        description="Export RUN_DIR's best checkpoint as an ONNX model whose output is the "
        "softmax probabilities followed by an out-of-distribution score (Mahalanobis distance "
        "of the penultimate embedding, fitted on the run's training crops, threshold set on its "
        "validation crops), with a manifest. Refused when the validation macro-F1 or any "
        "class's recall is below its floor (unless --force), or when MODEL_DIR already holds "
        "a model (unless --overwrite). ONNX Runtime must match torch on random batches, or "
        "nothing is written under the final names; every refusal exits with status 1.",
        formatter_class=_DefaultsHelpFormatter,
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="directory made by train")
    export.add_argument(
        "--out", type=Path, required=True, metavar="MODEL_DIR", help="model directory to write"
    )
    export.add_argument("--name", help="model name (default: the run directory's name)")
    export.add_argument("--version", default="1", help="model version")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    export.add_argument(
        "--overwrite", action="store_true", help="replace a model already in MODEL_DIR"
    )
    export.add_argument(
        "--force",
        action="store_true",
        help="export even below the floors; the manifest records that the guardrails failed",
    )
    export.add_argument(
        "--min-macro-f1",
        type=float,
        default=DEFAULT_MIN_MACRO_F1,
        help="validation macro-F1 floor",
    )
    export.add_argument(
        "--min-class-recall",
        type=float,
        default=DEFAULT_MIN_CLASS_RECALL,
        help="floor on every class's validation recall",
    )
    export.add_argument(
        "--ood-reject-rate",
        type=float,
        default=DEFAULT_FALSE_REJECT_RATE,
        metavar="RATE",
        help="share of in-distribution validation crops the out-of-distribution threshold may "
        "reject",
    )
    export.add_argument(
        "--no-ood",
        action="store_true",
        help="export without the out-of-distribution score (probabilities only)",
    )
    export.add_argument(
        "--data-source",
        choices=("simulated", "real", "mixed"),
        help="where the training images came from (default: simulated when the data folder "
        "holds the simulator's ground_truth.jsonl, else real)",
    )
    export.add_argument(
        "--evaluate",
        action="append",
        default=[],
        type=_parse_named_dir,
        metavar="NAME=DIR",
        help="a held-out ImageFolder to measure through the exported model and record in the "
        "manifest's evaluations (repeatable; held_out_site is the figure the dashboard shows)",
    )


def _add_evaluate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate an exported model on ImageFolders through ONNX Runtime, or a "
        "frozen encoder by its linear probe",
        usage="python -m model_zoo evaluate [options] MODEL_DIR DATA_DIR [DATA_DIR ...]\n"
        "       python -m model_zoo evaluate --linear-probe [options] ENCODER DATA_DIR",
        description="Classify every image under each DATA_DIR/<class>/ with the exported "
        "model (the daemon's preprocessing and ONNX Runtime backend) and report, per "
        "DATA_DIR, accuracy, macro-F1, per-class precision/recall/F1, the expected "
        f"calibration error ({CALIBRATION_BINS} equal-width bins of the top probability), "
        "the confusion matrix and the misclassified files; a DATA_DIR of at most "
        f"{PER_FILE_LIMIT} images is also listed file by file.\n\n"
        "With --linear-probe, the first argument is an ENCODER instead: a pretrain run "
        "directory (its encoder.pt), a train run directory (its checkpoint.pt) or a "
        "state_dict file (then give --arch). Its penultimate features (frozen; crops "
        "prepared with the run's input spec) of DATA_DIR's train split fit a logistic "
        "regression, reported on the validation and test splits: accuracy, macro-F1, "
        "per-class precision/recall/F1. DATA_DIR is one labelled folder, split as train "
        "splits it (train/ val/ [test/] folders, or class folders split by --split).",
        formatter_class=_DefaultsHelpRawFormatter,
    )
    evaluate.add_argument(
        "model_dir",
        type=Path,
        metavar="MODEL_DIR",
        help="made by export (with --linear-probe: the ENCODER)",
    )
    evaluate.add_argument(
        "data_dirs",
        type=Path,
        nargs="+",
        metavar="DATA_DIR",
        help="one folder per class; class names must be the model's (with --linear-probe: "
        "one labelled folder)",
    )
    evaluate.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write evaluation.json (every DATA_DIR) and confusion_matrix.png here "
        f"(with --linear-probe: {LINEAR_PROBE_FILE})",
    )
    evaluate.add_argument("--batch-size", type=int, default=64, help="images per ONNX Runtime call")
    evaluate.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime threads (0 = its default; with --linear-probe torch threads, "
        "0 = all cores)",
    )
    probe = evaluate.add_argument_group("linear probe")
    probe.add_argument(
        "--linear-probe",
        action="store_true",
        help="measure a frozen encoder: a linear classifier on its features",
    )
    probe.add_argument(
        "--arch",
        choices=list_models(),
        help="the encoder's architecture (default: the one its run recorded; needed for a "
        "bare state_dict file)",
    )
    probe.add_argument(
        "--input-size", type=int, help="side of the input, px (default: the run's, else 96)"
    )
    probe.add_argument(
        "--resize",
        choices=("letterbox", "stretch"),
        help="resize policy (default: the run's, else letterbox)",
    )
    probe.add_argument(
        "--layout",
        choices=("auto", "class-folders", "split-folders"),
        default="auto",
        help="as train's --layout",
    )
    probe.add_argument(
        "--split",
        type=_parse_split,
        default=",".join(f"{fraction * 100:g}" for fraction in DEFAULT_FRACTIONS),
        metavar="TRAIN,VAL,TEST",
        help="split percentages for a class-folder DATA_DIR",
    )
    probe.add_argument("--seed", type=int, default=0, help="seeds the split")
    probe.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _run_pretrain(parsed: argparse.Namespace, command: str) -> int:
    init = parsed.init
    if init is None:
        init = "imagenet" if parsed.arch in list_imagenet_models() else "scratch"
        print(f"--init {init} (the default for {parsed.arch})", file=sys.stderr)
    options = PretrainOptions(
        data_dir=parsed.data_dir,
        out_dir=parsed.out,
        method=parsed.method,
        arch=parsed.arch,
        init=init,
        input_size=parsed.input_size,
        resize=parsed.resize,
        epochs=parsed.epochs,
        batch_size=parsed.batch_size,
        lr=parsed.lr,
        weight_decay=parsed.weight_decay,
        temperature=parsed.temperature,
        projection_dim=parsed.projection_dim,
        seed=parsed.seed,
        workers=parsed.workers,
        threads=parsed.threads,
        device=parsed.device,
        resume=parsed.resume,
        overwrite=parsed.overwrite,
        command=command,
    )
    result = pretrain_model(options)
    run = shlex.quote(str(result.run_dir))
    print(
        f"\n{result.epochs_run} epochs ({result.resumed_from} before this start); final loss "
        f"{result.final_loss:.4f}; encoder {result.encoder_file}\n"
        f"next: python -m model_zoo evaluate --linear-probe {run} DATA_DIR\n"
        f"      python -m model_zoo train DATA_DIR --init {run} --arch {parsed.arch} --out RUN_DIR"
    )
    return 0


def _run_linear_probe(parsed: argparse.Namespace) -> int:
    if len(parsed.data_dirs) != 1:
        raise ModelZooError(
            "--linear-probe takes one ENCODER and one labelled DATA_DIR "
            f"(got {len(parsed.data_dirs)} data folders); run it once per folder"
        )
    report = run_linear_probe(
        parsed.model_dir,
        parsed.data_dirs[0],
        arch=parsed.arch,
        input_size=parsed.input_size,
        resize=parsed.resize,
        layout=parsed.layout,
        split=parsed.split,
        seed=parsed.seed,
        batch_size=parsed.batch_size,
        threads=parsed.threads,
        device=parsed.device,
        out_dir=parsed.out,
    )
    _print_linear_probe(report)
    if parsed.out is not None:
        print(f"\nwrote {parsed.out / LINEAR_PROBE_FILE}")
    return 0


def _print_linear_probe(report: LinearProbeReport) -> None:
    print(
        f"linear probe of {report.weights} ({report.origin}, {report.arch}, "
        f"{report.feature_dim} features at {report.input.size} px) on {report.data_dir}: "
        f"logistic regression fitted on {report.train_images} train images "
        f"(train accuracy {report.train.accuracy:.4f})"
    )
    for name, metrics in report.evaluations.items():
        print(f"\n== {name} ==")
        print(format_metrics_table(metrics))
        print(f"\naccuracy {metrics.accuracy:.4f}, macro-F1 {metrics.macro_f1:.4f}")
        print(
            "recall per class: "
            + ", ".join(f"{cls} {value.recall:.4f}" for cls, value in metrics.per_class.items())
        )


def _add_train_detector_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    detector = commands.add_parser(
        "train-detector",
        help="train the particle detector (separation = 'learned') on simulated frames",
        description="Render simulated frames from sparse to dense slurries and train the "
        "particle detector on them; writes detector.onnx and detector.json into OUT_DIR "
        "(point particles.detector at it).",
        formatter_class=_DefaultsHelpFormatter,
    )
    detector.add_argument("out", type=Path, metavar="OUT_DIR", help="folder to write")
    detector.add_argument("--frames", type=int, default=1600, help="simulated training frames")
    detector.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    detector.add_argument("--batch-size", type=int, default=16, help="crops per step")
    detector.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    detector.add_argument("--seed", type=int, default=0, help="seed of frames and training")
    detector.add_argument("--workers", type=int, default=2, help="processes rendering frames")
    detector.add_argument(
        "--init",
        type=Path,
        metavar="DETECTOR_DIR",
        help="fine-tune this detector (its detector.pt) instead of starting from scratch",
    )


def _run_train_detector(parsed: argparse.Namespace, command: str) -> int:
    # Imported here: torch takes seconds to load and the other commands import it anyway.
    from model_zoo.particle_detector import (  # noqa: PLC0415
        DetectorTrainOptions,
        export_detector,
        train_detector,
    )

    for name in ("frames", "steps", "batch_size", "workers"):
        if getattr(parsed, name) < 1:
            raise ModelZooError(f"--{name.replace('_', '-')} must be at least 1")
    options = DetectorTrainOptions(
        frames=parsed.frames,
        steps=parsed.steps,
        batch_size=parsed.batch_size,
        learning_rate=parsed.lr,
        seed=parsed.seed,
        workers=parsed.workers,
        init=parsed.init,
    )
    model = train_detector(options, progress=lambda line: print(line, file=sys.stderr))
    manifest = export_detector(
        model,
        parsed.out,
        {
            "name": parsed.out.name,
            "command": command,
            "init": None if parsed.init is None else str(parsed.init),
            "frames": options.frames,
            "steps": options.steps,
        },
    )
    print(manifest)
    return 0


def _run_train(parsed: argparse.Namespace, command: str) -> int:
    init = parsed.init
    if parsed.init_weights is not None:
        if init not in (None, parsed.init_weights):
            raise ModelZooError(
                f"--init {init} and --init-weights {parsed.init_weights} disagree; "
                "give one (--init-weights FILE is the same as --init FILE)"
            )
        init = parsed.init_weights
    if init is None:
        # ImageNet features generalise to sites never trained on far better (MODEL_CARD.md).
        init = "imagenet" if parsed.arch in list_imagenet_models() else "scratch"
        print(f"--init {init} (the default for {parsed.arch})", file=sys.stderr)
    options = TrainOptions(
        data_dir=parsed.data_dir,
        out_dir=parsed.out,
        arch=parsed.arch,
        input_size=parsed.input_size,
        resize=parsed.resize,
        epochs=parsed.epochs,
        batch_size=parsed.batch_size,
        lr=parsed.lr,
        weight_decay=parsed.weight_decay,
        schedule=parsed.schedule,
        patience=parsed.patience,
        seed=parsed.seed,
        init=init,
        workers=parsed.workers,
        threads=parsed.threads,
        uncertainty_threshold=parsed.uncertainty_threshold,
        balance=parsed.balance,
        layout=parsed.layout,
        split=parsed.split,
        device=parsed.device,
        augment=parsed.augment,
        overwrite=parsed.overwrite,
        command=command,
    )
    result = train_model(options)
    print(
        f"\nbest epoch {result.best_epoch} of {result.epochs_run}; validation macro-F1 "
        f"{result.validation.macro_f1:.4f}; run directory {result.run_dir}\n"
        f"next: python -m model_zoo export {shlex.quote(str(result.run_dir))} --out MODEL_DIR"
    )
    return 0


def _run_export(parsed: argparse.Namespace) -> int:
    export_model(
        parsed.run_dir,
        parsed.out,
        name=parsed.name,
        version=parsed.version,
        opset=parsed.opset,
        overwrite=parsed.overwrite,
        force=parsed.force,
        min_macro_f1=parsed.min_macro_f1,
        min_class_recall=parsed.min_class_recall,
        ood_false_reject_rate=None if parsed.no_ood else parsed.ood_reject_rate,
        data_source=parsed.data_source,
        evaluate=dict(parsed.evaluate),
    )
    print(parsed.out / "manifest.json")
    return 0


def _run_evaluate(parsed: argparse.Namespace) -> int:
    reports = evaluate_model_dirs(
        parsed.model_dir,
        parsed.data_dirs,
        out_dir=parsed.out,
        batch_size=parsed.batch_size,
        threads=parsed.threads,
    )
    for index, report in enumerate(reports):
        if index:
            print()
        _print_evaluation(report)
    if parsed.out is None:
        print("\n(pass --out DIR to write evaluation.json and confusion_matrix.png)")
    else:
        print(f"\nwrote {parsed.out / 'evaluation.json'}")
    return 0


def _print_evaluation(report: EvaluationReport) -> None:
    print(f"== {report.data_dir} ==")
    print(format_metrics_table(report.metrics))
    print(
        f"\naccuracy {report.metrics.accuracy:.4f}, macro-F1 {report.metrics.macro_f1:.4f} "
        f"on {report.images} images; {report.uncertain} uncertain, of which "
        f"{report.out_of_distribution} out of distribution"
    )
    print(
        "recall per class: "
        + ", ".join(f"{name} {recall:.4f}" for name, recall in report.recall_per_class.items())
    )
    print(
        f"expected calibration error {report.expected_calibration_error:.4f} "
        f"({CALIBRATION_BINS} bins of the top probability)"
    )
    print(
        "confusion matrix (rows true, columns predicted, order " + ", ".join(report.classes) + "):"
    )
    for name, row in zip(report.classes, report.metrics.confusion_matrix, strict=True):
        print(f"  {name}: {row}")
    if report.lists_files:
        print(f"\nevery file ({report.images}): file, true, predicted, confidence, flag")
        for prediction in report.predictions:
            flag = f"\t{prediction.reason}" if prediction.reason else ""
            print(
                f"  {prediction.path}\t{prediction.true}\t{prediction.predicted}\t"
                f"{prediction.confidence:.3f}{flag}"
            )
    print(f"\nmisclassified ({len(report.misclassified)}):")
    for item in report.misclassified:
        print(
            f"  {item.path}\ttrue {item.true}\tpredicted {item.predicted}\tp={item.probability:.3f}"
        )
    for path, reason in report.unreadable:
        print(f"unreadable: {path}: {reason}", file=sys.stderr)


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" where it informs: not on flags or required options."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


class _DefaultsHelpRawFormatter(_DefaultsHelpFormatter):
    """The same, keeping the description's paragraphs (each still wrapped)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            super(_DefaultsHelpRawFormatter, self)._fill_text(part, width, indent)
            for part in text.split("\n\n")
        )


def _parse_init(text: str) -> str | Path:
    return text if text in ("scratch", "imagenet") else Path(text)


def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(part) for part in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0 or parts[0] <= 0:
        raise argparse.ArgumentTypeError(
            f"expected three non-negative percentages TRAIN,VAL,TEST such as 70,25,5, got {text!r}"
        )
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def _parse_named_dir(text: str) -> tuple[str, Path]:
    name, separator, folder = text.partition("=")
    if not separator or not name or not folder:
        raise argparse.ArgumentTypeError(
            f"expected NAME=DIR such as held_out_site=data/site-9, got {text!r}"
        )
    return name, Path(folder)
