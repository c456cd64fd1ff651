"""Export a run directory to a model directory: `model.onnx` + `manifest.json`.

The ONNX graph outputs softmax probabilities followed by the out-of-distribution
score (`model_zoo.ood`; the manifest says so) and has a dynamic batch axis. Before
anything is written:

* the guardrails: validation macro-F1 and every class's recall must reach their floors
  (`--force` writes the model anyway and records that it failed them);
* an existing model directory is only replaced with `overwrite`;
* the score is fitted on the run's training crops and its threshold calibrated on its
  validation crops, both re-read from `splits.json`.

ONNX Runtime, through the daemon's own backend, must then reproduce torch's outputs
on random inputs of several batch sizes; otherwise the export fails and leaves no
manifest, so a broken file can never look deployable.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from model_zoo.checkpoint import load_state_dict
from model_zoo.errors import ModelZooError
from model_zoo.evaluation import evaluate_model_dir
from model_zoo.imagefolder import LabelledFile, load_images
from model_zoo.ood import (
    DEFAULT_FALSE_REJECT_RATE,
    ScoredClassifier,
    calibrate_threshold,
    embed_images,
    fit_layers,
    scored_layers,
)
from model_zoo.registry import create_model
from model_zoo.training import ARGS_FILE, CHECKPOINT_FILE, EVALUATION_FILE, SPLITS_FILE
from monitor.imaging.preprocess import prepare_batch
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
from monitor.manifest import (
    MANIFEST_FILE,
    EvaluationMetrics,
    Guardrails,
    InputSpec,
    LoadedModel,
    ModelManifest,
    OodSpec,
    TrainingData,
    sha256_of_file,
)
from monitor.simulator.writer import GROUND_TRUTH_FILE

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 17
# The dynamo exporter's lowest well-supported opset.
DYNAMO_MIN_OPSET = 18
PARITY_TOLERANCE = 1e-4
# The score is a distance of order 10-1000, computed through a whitening matrix whose
# float32 rounding differs between torch and ONNX Runtime kernels: compared relative to
# its size. 1 % moves a decision only for a crop within 1 % of the threshold.
SCORE_PARITY_TOLERANCE = 1e-2
# What of args.json goes into the manifest's recipe.
RECIPE_KEYS = (
    "arch",
    "init",
    "init_weights_sha256",
    "input_size",
    "resize",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "schedule",
    "augment",
    "balance",
    "seed",
)
DEFAULT_MIN_MACRO_F1 = 0.90
DEFAULT_MIN_CLASS_RECALL = 0.80
PARITY_BATCH_SIZES = (1, 7)
PARITY_REAL_CROPS = 64
# Standard deviations of the random parity inputs (normalised units; real images ~1).
PARITY_INPUT_SCALES = (1.0, 0.1, 0.01)
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
SCORED_OUTPUT_NAME = "probabilities_ood_score"


class ExportError(ModelZooError):
    """The export could not produce a model the daemon can trust."""


class SoftmaxClassifier(nn.Module):
    """A classifier whose output is probabilities instead of logits."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(images), dim=1)


def export_model(
    run_dir: Path,
    model_dir: Path,
    *,
    name: str | None = None,
    version: str = "1",
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    force: bool = False,
    min_macro_f1: float = DEFAULT_MIN_MACRO_F1,
    min_class_recall: float = DEFAULT_MIN_CLASS_RECALL,
    ood_false_reject_rate: float | None = DEFAULT_FALSE_REJECT_RATE,
    data_source: str | None = None,
    evaluate: dict[str, Path] | None = None,
) -> ModelManifest:
    """Export the run's best checkpoint; return the manifest written beside the ONNX file.

    `ood_false_reject_rate` None exports without the out-of-distribution score (plain
    probabilities); `evaluate` names held-out ImageFolders whose metrics, measured
    through the exported model, go into the manifest's `evaluations`.
    """
    args = _read_json(run_dir / ARGS_FILE, "run arguments")
    evaluation = _read_json(run_dir / EVALUATION_FILE, "evaluation")
    checkpoint_path = run_dir / CHECKPOINT_FILE
    classes = tuple(args["classes"])
    spec = InputSpec.model_validate(args["input"])
    validation = EvaluationMetrics.model_validate(evaluation["validation"])
    guardrails = check_guardrails(validation, min_macro_f1, min_class_recall, force=force)
    _check_destination(model_dir, overwrite=overwrite)
    network = create_model(args["arch"], len(classes))
    network.load_state_dict(load_state_dict(checkpoint_path))
    network.eval()
    splits = _read_json(run_dir / SPLITS_FILE, "splits")

    classifier: nn.Module
    ood: OodSpec | None = None
    real_inputs: np.ndarray | None = None
    if ood_false_reject_rate is None:
        classifier = SoftmaxClassifier(network).eval()
    else:
        classifier, ood, real_inputs = _fit_ood(network, splits, spec, ood_false_reject_rate)

    model_dir.mkdir(parents=True, exist_ok=True)
    partial = model_dir / (ONNX_FILE + ".partial")
    try:
        used_opset = write_onnx(
            classifier,
            partial,
            spec.size,
            opset,
            output_name=OUTPUT_NAME if ood is None else SCORED_OUTPUT_NAME,
        )
        _check_self_contained(partial)
        manifest = ModelManifest(
            name=name or run_dir.resolve().name,
            version=version,
            architecture=args["arch"],
            classes=classes,
            input=spec,
            output="probabilities" if ood is None else "probabilities+ood_score",
            uncertainty_threshold=args["uncertainty_threshold"],
            ood=ood,
            onnx_file=ONNX_FILE,
            onnx_sha256=sha256_of_file(partial),
            checkpoint_sha256=sha256_of_file(checkpoint_path),
            opset=used_opset,
            validation=validation,
            test=(
                EvaluationMetrics.model_validate(evaluation["test"])
                if evaluation.get("test")
                else None
            ),
            training_data=describe_training_data(splits, data_source),
            guardrails=guardrails,
            training_command=args.get("command") or args.get("argv", ""),
            recipe={key: args[key] for key in RECIPE_KEYS if key in args},
            created=datetime.now(UTC),
        )
        parity = measure_parity(
            classifier,
            LoadedModel(directory=model_dir, onnx_path=partial, manifest=manifest),
            real_inputs,
        )
        if parity.max_difference > PARITY_TOLERANCE or (
            parity.max_score_difference > SCORE_PARITY_TOLERANCE
        ):
            raise ExportError(
                "ONNX Runtime and torch disagree: probabilities differ by up to "
                f"{parity.max_difference:.3g} (tolerance {PARITY_TOLERANCE:g}), the "
                f"out-of-distribution score by up to {parity.max_score_difference:.3g} "
                f"relative (tolerance {SCORE_PARITY_TOLERANCE:g}); no manifest written. Try "
                "another --opset, or report the architecture and torch version"
            )
        partial.replace(model_dir / ONNX_FILE)
    finally:
        partial.unlink(missing_ok=True)
    _write_manifest(model_dir, manifest)
    print(
        f"exported {manifest.architecture} ({', '.join(classes)}) at {spec.size} px, opset "
        f"{used_opset}; ONNX Runtime matches torch within {parity.max_difference:.1e} on "
        f"{parity.rows} random inputs ({parity.unsaturated_rows} not saturated) -> {model_dir}",
        file=sys.stderr,
    )
    if ood is not None:
        print(
            f"out-of-distribution score: threshold {ood.threshold:.3f} rejects "
            f"{ood.validation_false_reject_rate:.2%} of {ood.calibrated_on_images} validation "
            f"crops (target {ood.target_false_reject_rate:.0%}); fitted on "
            f"{ood.fitted_on_images} training crops, shrinkage {ood.shrinkage:.3f}",
            file=sys.stderr,
        )
    if not guardrails.passed:
        print(
            "warning: exported with --force although: " + "; ".join(guardrails.problems),
            file=sys.stderr,
        )
    if parity.unsaturated_rows == 0:
        print(
            "warning: every parity output was saturated (probability ~1), so the check "
            "compared little; evaluate the model on real images before deploying it",
            file=sys.stderr,
        )
    if evaluate:
        manifest = _record_evaluations(model_dir, manifest, evaluate)
    return manifest


def check_guardrails(
    validation: EvaluationMetrics,
    min_macro_f1: float,
    min_class_recall: float,
    *,
    force: bool,
) -> Guardrails:
    """The floors a model must reach before it may go live; ExportError names each miss."""
    problems = []
    if validation.macro_f1 < min_macro_f1:
        problems.append(
            f"validation macro-F1 {validation.macro_f1:.4f} is below the floor {min_macro_f1:.2f}"
        )
    for class_name, metrics in validation.per_class.items():
        if metrics.recall < min_class_recall:
            problems.append(
                f"validation recall of {class_name} {metrics.recall:.4f} is below the floor "
                f"{min_class_recall:.2f}"
            )
    if problems and not force:
        raise ExportError(
            "refusing to export a model that would mislead the plant: "
            + "; ".join(problems)
            + ". Train longer or on more (or better labelled) images; --force exports it "
            "anyway and records the failure in the manifest"
        )
    return Guardrails(
        min_macro_f1=min_macro_f1,
        min_class_recall=min_class_recall,
        passed=not problems,
        problems=problems,
    )


def describe_training_data(splits: dict[str, Any], source: str | None) -> TrainingData:
    """Provenance from splits.json: simulated when the simulator's ground truth is there."""
    data_dir = Path(str(splits["data_dir"]))
    if source is None:
        candidates = [data_dir, *(child for child in data_dir.glob("*") if child.is_dir())]
        simulated = any((folder / GROUND_TRUTH_FILE).is_file() for folder in candidates)
        source = "simulated" if simulated else "real"
    counts = splits.get("counts") or {}
    return TrainingData.model_validate(
        {
            "source": source,
            "data_dir": str(data_dir),
            "counts": {str(key): list(value) for key, value in dict(counts).items()},
        }
    )


def _fit_ood(
    network: nn.Module, splits: dict[str, Any], spec: InputSpec, false_reject_rate: float
) -> tuple[ScoredClassifier, OodSpec, np.ndarray]:
    """Fit the score on the training crops, set its threshold on the validation crops;
    also return up to PARITY_REAL_CROPS prepared validation crops for the parity check."""
    data_dir = Path(str(splits["data_dir"]))
    classes = list(splits["classes"])

    def files_of(split: str) -> list[LabelledFile]:
        rows = splits.get(split) or []
        return [LabelledFile(data_dir / path, classes.index(label)) for path, label in rows]

    train = load_images(files_of("train"), description="decode train (OOD fit)")
    validation = load_images(files_of("validation"), description="decode validation (OOD)")
    if not train.files or not validation.files:
        raise ExportError(
            f"the run's training or validation crops are gone from {data_dir}: the "
            "out-of-distribution score is fitted on them (restore the data, or pass "
            "--no-ood to export without the score)"
        )
    layers = scored_layers(network)
    validation_features = embed_images(network, validation.images, spec, layers=layers)
    fit = fit_layers(
        layers,
        embed_images(network, train.images, spec, layers=layers),
        train.labels,
        validation_features,
        len(classes),
    )
    validation_scores = fit.score(validation_features)
    threshold = calibrate_threshold(validation_scores, false_reject_rate)
    spec_ood = OodSpec(
        method="mahalanobis",
        layers=fit.layers,
        embedding_dim=fit.dims,
        threshold=threshold,
        target_false_reject_rate=false_reject_rate,
        validation_false_reject_rate=float((validation_scores > threshold).mean()),
        fitted_on_images=len(train.files),
        calibrated_on_images=len(validation.files),
        shrinkage=fit.shrinkage,
        parameters_sha256=fit.digest(),
    )
    real_inputs = prepare_batch(validation.images[:PARITY_REAL_CROPS], spec)
    return ScoredClassifier(network, fit).eval(), spec_ood, real_inputs


def _record_evaluations(
    model_dir: Path, manifest: ModelManifest, evaluate: dict[str, Path]
) -> ModelManifest:
    """Measure each named held-out set through the exported model; store the metrics."""
    results = dict(manifest.evaluations)
    for set_name, data_dir in evaluate.items():
        report = evaluate_model_dir(model_dir, data_dir)
        results[set_name] = report.metrics
        print(
            f"{set_name} ({data_dir}): accuracy {report.metrics.accuracy:.4f}, macro-F1 "
            f"{report.metrics.macro_f1:.4f} on {report.images} images",
            file=sys.stderr,
        )
    updated = manifest.model_copy(update={"evaluations": results})
    _write_manifest(model_dir, ModelManifest.model_validate(updated.model_dump()))
    return updated


def _check_destination(model_dir: Path, *, overwrite: bool) -> None:
    existing = [p.name for p in (model_dir / MANIFEST_FILE, model_dir / ONNX_FILE) if p.exists()]
    if existing and not overwrite:
        raise ExportError(
            f"{model_dir} already holds a model ({', '.join(existing)}); choose another --out "
            "or pass --overwrite"
        )


def _write_manifest(model_dir: Path, manifest: ModelManifest) -> None:
    manifest_partial = model_dir / (MANIFEST_FILE + ".partial")
    manifest_partial.write_text(manifest.model_dump_json(indent=2) + "\n")
    manifest_partial.replace(model_dir / MANIFEST_FILE)


def write_onnx(
    classifier: nn.Module,
    path: Path,
    input_size: int,
    opset: int,
    *,
    output_name: str = OUTPUT_NAME,
) -> int:
    """Write one self-contained ONNX file with a dynamic batch axis; return its opset.

    The TorchScript exporter is tried first: it is fast and reliable for these
    convolutional networks. torch deprecates it, so when it fails (or is gone) the
    dynamo exporter takes over.
    """
    example = torch.randn(2, 3, input_size, input_size)
    try:
        with warnings.catch_warnings():
            # We choose the legacy exporter on purpose; its deprecation notice is known.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                classifier,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
            )
    except Exception as exc:
        print(
            f"TorchScript ONNX export failed ({exc}); trying the dynamo exporter", file=sys.stderr
        )
        try:
            program = torch.onnx.export(
                classifier,
                (example,),
                dynamo=True,
                opset_version=max(opset, DYNAMO_MIN_OPSET),
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                verbose=False,
            )
            if program is None:
                raise ExportError("the dynamo exporter returned no program")
            program.save(str(path), external_data=False)
        except Exception as dynamo_exc:
            raise ExportError(
                f"both ONNX exporters failed: TorchScript: {exc}; dynamo: {dynamo_exc} "
                "(try another --opset, or report the architecture and torch version)"
            ) from dynamo_exc
    return read_opset(path)


def read_opset(path: Path) -> int:
    """The default-domain opset of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError(f"{path} declares no ai.onnx opset")


@dataclass(frozen=True)
class ParityReport:
    """How closely ONNX Runtime reproduced torch, and on how many telling outputs."""

    max_difference: float
    unsaturated_rows: int
    rows: int
    max_score_difference: float = 0.0
    """Largest relative difference of the out-of-distribution score (0 without one)."""


def measure_parity(
    classifier: nn.Module, loaded: LoadedModel, real_inputs: np.ndarray | None = None
) -> ParityReport:
    """Largest |torch - ONNX Runtime| difference over random batches of several sizes,
    and over `real_inputs` (prepared validation crops) when given.

    A trained network answers pure noise with probabilities of exactly 0 and 1, on
    which any two implementations agree; the noise is therefore also scaled down,
    which moves the logits towards each other and makes the comparison telling. The
    out-of-distribution score of noise is far above any threshold; the real crops
    check it where decisions are made, near the threshold.
    """
    size = loaded.manifest.input.size
    n_classes = len(loaded.manifest.classes)
    generator = torch.Generator().manual_seed(0)
    backend = OnnxRuntimeBackend(loaded)
    worst = worst_score = 0.0
    unsaturated = rows = 0
    batches = [
        torch.randn(batch_size, 3, size, size, generator=generator) * scale
        for scale in PARITY_INPUT_SCALES
        for batch_size in PARITY_BATCH_SIZES
    ]
    if real_inputs is not None and len(real_inputs):
        batches.append(torch.from_numpy(real_inputs))
    try:
        for inputs in batches:
            batch_size = len(inputs)
            with torch.no_grad():
                expected = classifier(inputs).numpy()
            actual = backend.infer(inputs.numpy())
            if actual.shape != expected.shape:
                raise ExportError(
                    f"ONNX output has shape {actual.shape} for a batch of {batch_size}, "
                    f"torch {expected.shape}; the batch axis is not dynamic"
                )
            probabilities = expected[:, :n_classes]
            worst = max(worst, float(np.abs(actual - expected)[:, :n_classes].max()))
            if expected.shape[1] > n_classes:
                magnitude = np.maximum(np.abs(expected[:, n_classes:]), 1.0)
                relative = np.abs(actual - expected)[:, n_classes:] / magnitude
                worst_score = max(worst_score, float(relative.max()))
            unsaturated += int((probabilities.max(axis=1) < 0.999).sum())
            rows += batch_size
    finally:
        backend.close()
    return ParityReport(
        max_difference=worst,
        unsaturated_rows=unsaturated,
        rows=rows,
        max_score_difference=worst_score,
    )


def _check_self_contained(path: Path) -> None:
    model = onnx.load(str(path), load_external_data=False)
    external = [
        tensor.name
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ExportError(
            f"{path} keeps {len(external)} tensors in external files; the model directory must "
            "hold one self-contained ONNX file"
        )
    onnx.checker.check_model(model)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(
            f"{what} file not found: {path} (point export at a run directory written by "
            "`python -m model_zoo train`, after training finished)"
        )
    return json.loads(path.read_text())
