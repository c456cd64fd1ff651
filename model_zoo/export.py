"""Export a run directory to a model directory: `model.onnx` + `manifest.json`.

The ONNX graph outputs softmax probabilities (the manifest promises that) and has
a dynamic batch axis. Before anything is written under its final name, ONNX
Runtime, through the daemon's own backend, must reproduce torch's probabilities
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

import numpy as np
import onnx
import torch
from torch import nn

from model_zoo.checkpoint import load_state_dict
from model_zoo.errors import ModelZooError
from model_zoo.registry import create_model
from model_zoo.training import ARGS_FILE, CHECKPOINT_FILE, EVALUATION_FILE
from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend
from monitor.manifest import (
    MANIFEST_FILE,
    EvaluationMetrics,
    InputSpec,
    LoadedModel,
    ModelManifest,
    sha256_of_file,
)

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 17
# The dynamo exporter's lowest well-supported opset.
DYNAMO_MIN_OPSET = 18
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 7)
# Standard deviations of the random parity inputs (normalised units; real images ~1).
PARITY_INPUT_SCALES = (1.0, 0.1, 0.01)
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


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
) -> ModelManifest:
    """Export the run's best checkpoint; return the manifest written beside the ONNX file."""
    args = _read_json(run_dir / ARGS_FILE, "run arguments")
    evaluation = _read_json(run_dir / EVALUATION_FILE, "evaluation")
    checkpoint_path = run_dir / CHECKPOINT_FILE
    classes = tuple(args["classes"])
    spec = InputSpec.model_validate(args["input"])
    network = create_model(args["arch"], len(classes))
    network.load_state_dict(load_state_dict(checkpoint_path))
    classifier = SoftmaxClassifier(network).eval()

    model_dir.mkdir(parents=True, exist_ok=True)
    partial = model_dir / (ONNX_FILE + ".partial")
    try:
        used_opset = write_onnx(classifier, partial, spec.size, opset)
        _check_self_contained(partial)
        manifest = ModelManifest(
            name=name or run_dir.resolve().name,
            version=version,
            architecture=args["arch"],
            classes=classes,
            input=spec,
            uncertainty_threshold=args["uncertainty_threshold"],
            onnx_file=ONNX_FILE,
            onnx_sha256=sha256_of_file(partial),
            checkpoint_sha256=sha256_of_file(checkpoint_path),
            opset=used_opset,
            validation=EvaluationMetrics.model_validate(evaluation["validation"]),
            test=(
                EvaluationMetrics.model_validate(evaluation["test"])
                if evaluation.get("test")
                else None
            ),
            training_command=args.get("command") or args.get("argv", ""),
            created=datetime.now(UTC),
        )
        parity = measure_parity(
            classifier,
            LoadedModel(directory=model_dir, onnx_path=partial, manifest=manifest),
        )
        if parity.max_difference > PARITY_TOLERANCE:
            raise ExportError(
                "ONNX Runtime and torch disagree: probabilities differ by up to "
                f"{parity.max_difference:.3g} "
                f"(tolerance {PARITY_TOLERANCE:g}); no manifest written. Try another --opset, "
                "or report the architecture and torch version"
            )
        partial.replace(model_dir / ONNX_FILE)
    finally:
        partial.unlink(missing_ok=True)
    manifest_partial = model_dir / (MANIFEST_FILE + ".partial")
    manifest_partial.write_text(manifest.model_dump_json(indent=2) + "\n")
    manifest_partial.replace(model_dir / MANIFEST_FILE)
    print(
        f"exported {manifest.architecture} ({', '.join(classes)}) at {spec.size} px, opset "
        f"{used_opset}; ONNX Runtime matches torch within {parity.max_difference:.1e} on "
        f"{parity.rows} random inputs ({parity.unsaturated_rows} not saturated) -> {model_dir}",
        file=sys.stderr,
    )
    if parity.unsaturated_rows == 0:
        print(
            "warning: every parity output was saturated (probability ~1), so the check "
            "compared little; evaluate the model on real images before deploying it",
            file=sys.stderr,
        )
    return manifest


def write_onnx(classifier: nn.Module, path: Path, input_size: int, opset: int) -> int:
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
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
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
                output_names=[OUTPUT_NAME],
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


def measure_parity(classifier: nn.Module, loaded: LoadedModel) -> ParityReport:
    """Largest |torch - ONNX Runtime| probability over random batches of several sizes.

    A trained network answers pure noise with probabilities of exactly 0 and 1, on
    which any two implementations agree; the noise is therefore also scaled down,
    which moves the logits towards each other and makes the comparison telling.
    """
    size = loaded.manifest.input.size
    generator = torch.Generator().manual_seed(0)
    backend = OnnxRuntimeBackend(loaded)
    worst = 0.0
    unsaturated = rows = 0
    try:
        for scale in PARITY_INPUT_SCALES:
            for batch_size in PARITY_BATCH_SIZES:
                inputs = torch.randn(batch_size, 3, size, size, generator=generator) * scale
                with torch.no_grad():
                    expected = classifier(inputs).numpy()
                actual = backend.infer(inputs.numpy())
                if actual.shape != expected.shape:
                    raise ExportError(
                        f"ONNX output has shape {actual.shape} for a batch of {batch_size}, "
                        f"torch {expected.shape}; the batch axis is not dynamic"
                    )
                worst = max(worst, float(np.abs(actual - expected).max()))
                unsaturated += int((expected.max(axis=1) < 0.999).sum())
                rows += batch_size
    finally:
        backend.close()
    return ParityReport(max_difference=worst, unsaturated_rows=unsaturated, rows=rows)


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


def _read_json(path: Path, what: str) -> dict[str, object]:
    if not path.is_file():
        raise ExportError(
            f"{what} file not found: {path} (point export at a run directory written by "
            "`python -m model_zoo train`, after training finished)"
        )
    return json.loads(path.read_text())
