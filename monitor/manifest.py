"""The model manifest: an exported classifier describes itself.

`model_zoo` writes `manifest.json` beside `model.onnx`; the daemon and `classify`
read every preprocessing detail from it and hard-code none (the idea of timm's
`PretrainedCfg` and torchvision's `Weights`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION: Literal[1] = 1


class ManifestError(Exception):
    """A model directory whose manifest or ONNX file cannot be used, with the fix in the text."""


class InputSpec(BaseModel):
    """How an image becomes the network's input tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=16, le=1024, description="Side of the square input, pixels.")
    channels: Literal[3] = Field(
        default=3, description="Input channels; greyscale is replicated into all three."
    )
    resize: Literal["letterbox", "stretch"] = Field(
        description="letterbox keeps the aspect ratio and pads with the image median; "
        "stretch scales each axis independently."
    )
    mean: tuple[float, float, float] = Field(description="Per-channel mean, in [0, 1] units.")
    std: tuple[float, float, float] = Field(description="Per-channel std, in [0, 1] units.")

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("every std must be > 0")
        return value


class ClassMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: float
    recall: float
    f1: float
    support: int


class EvaluationMetrics(BaseModel):
    """Metrics on one labelled set, as `model_zoo` computes them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]] = Field(
        description="Rows are true classes, columns predicted, in manifest class order."
    )


OutputLayout = Literal["probabilities", "probabilities+ood_score"]


class OodSpec(BaseModel):
    """The "not a crystal" test: a distance in the network's own feature space.

    The ONNX graph computes the score and appends it as the last output column, so every
    backend returns it with the probabilities: for each layer in `layers` (the channel
    means and deviations of intermediate blocks, and the penultimate embedding), the
    Mahalanobis distance to the nearest class mean under the training features' shared,
    shrunk covariance, divided by that layer's validation 99th percentile; the score is
    the largest ratio. The fitted means and whitening matrices are constants of that
    graph (a D x D matrix has no place in JSON); their digest is recorded here.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["mahalanobis"] = Field(description="Score: Mahalanobis to the nearest class.")
    layers: list[str] = Field(
        min_length=1, description="Feature layers scored (module names, then 'embedding')."
    )
    embedding_dim: int = Field(ge=1, description="Feature width over all scored layers.")
    threshold: float = Field(gt=0, description="A score above this is out of distribution.")
    target_false_reject_rate: float = Field(
        gt=0, lt=1, description="In-distribution reject rate the threshold was set for."
    )
    validation_false_reject_rate: float = Field(
        ge=0, le=1, description="Share of validation crops above the threshold, as measured."
    )
    fitted_on_images: int = Field(ge=1, description="Training crops the means/covariance saw.")
    calibrated_on_images: int = Field(ge=1, description="Validation crops the threshold saw.")
    shrinkage: float = Field(
        ge=0, le=1, description="Largest covariance shrinkage towards a scaled I over the layers."
    )
    parameters_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="Digest of the fitted means and whitening matrix."
    )


class TrainingData(BaseModel):
    """Provenance of the training images: a plant reads "simulated only" as a warning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["simulated", "real", "mixed"] = Field(
        description="simulated: made by `crystal-monitor simulate` (its ground_truth.jsonl)."
    )
    data_dir: str = Field(description="The ImageFolder the run trained on.")
    counts: dict[str, list[int]] = Field(
        description="Images per split (train, validation, test), per class in class order."
    )


class Guardrails(BaseModel):
    """What `model_zoo export` required of the validation metrics before writing the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_macro_f1: float = Field(ge=0, le=1)
    min_class_recall: float = Field(ge=0, le=1)
    passed: bool = Field(description="False only when the export was forced past a floor.")
    problems: list[str] = Field(default_factory=list, description="Each floor that failed.")


class ModelManifest(BaseModel):
    """Everything the daemon needs to run an exported classifier correctly."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Manifest schema.")
    name: str = Field(min_length=1, description="Model name, e.g. cex-pg-mobilenetv3.")
    version: str = Field(min_length=1, description="Model version.")
    architecture: str = Field(description="model_zoo registry name of the network.")
    classes: tuple[str, ...] = Field(min_length=2, description="Class names in output order.")
    input: InputSpec
    output: OutputLayout = Field(
        default="probabilities",
        description="The ONNX output's columns: softmax probabilities in class order, then, "
        "for 'probabilities+ood_score', the out-of-distribution score (see `ood`).",
    )
    uncertainty_threshold: float = Field(
        gt=0, le=1, description="Top probability below this counts as uncertain."
    )
    onnx_file: str = Field(default="model.onnx", description="ONNX file, relative to the manifest.")
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    checkpoint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=7)
    validation: EvaluationMetrics = Field(description="Metrics on the validation split.")
    test: EvaluationMetrics | None = Field(
        default=None, description="Metrics on the held-out test split, when there was one."
    )
    ood: OodSpec | None = Field(
        default=None,
        description="How the out-of-distribution score in the last output column is computed "
        "and where it rejects; required with output 'probabilities+ood_score'.",
    )
    evaluations: dict[str, EvaluationMetrics] = Field(
        default_factory=dict,
        description="Metrics on held-out sets measured at export, by name (e.g. held_out_site, "
        "held_out_seed, reference).",
    )
    training_data: TrainingData | None = Field(
        default=None, description="Where the training images came from, and how many."
    )
    guardrails: Guardrails | None = Field(
        default=None, description="The floors the export checked, and whether it was forced."
    )
    training_command: str = Field(description="The command line that trained the checkpoint.")
    recipe: dict[str, Any] = Field(
        default_factory=dict,
        description="The resolved training recipe: architecture, initial weights (scratch, "
        "imagenet or a file, with its sha256), input size, epochs, optimiser settings.",
    )
    created: datetime

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"class names must be unique, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _matrix_matches_classes(self) -> ModelManifest:
        n = len(self.classes)
        if (self.output == "probabilities+ood_score") != (self.ood is not None):
            raise ValueError(
                "output 'probabilities+ood_score' and the `ood` section go together: "
                "re-export the model"
            )
        named = [("validation", self.validation), ("test", self.test)]
        named += [(f"evaluations.{key}", value) for key, value in self.evaluations.items()]
        for label, metrics in named:
            if metrics is None:
                continue
            matrix = metrics.confusion_matrix
            if len(matrix) != n or any(len(row) != n for row in matrix):
                raise ValueError(f"{label}.confusion_matrix must be {n} x {n} (one row per class)")
        return self


HELD_OUT_SITE = "held_out_site"
"""The `evaluations` key of the figure a plant should read first: a site never trained on."""


def describe_model_quality(manifest: ModelManifest) -> dict[str, Any]:
    """What the daemon logs, doctor prints and the dashboard shows about a model's worth.

    Plain values: the held-out-site figure (None when the model was not measured on
    one), where the training images came from, whether it passed the export's
    guardrails, and whether it can reject out-of-distribution crops.
    """
    site = manifest.evaluations.get(HELD_OUT_SITE)
    source = manifest.training_data.source if manifest.training_data else "unknown"
    guardrails = manifest.guardrails
    summary: dict[str, Any] = {
        "validation_macro_f1": round(manifest.validation.macro_f1, 4),
        "held_out_site_accuracy": None if site is None else round(site.accuracy, 4),
        "held_out_site_macro_f1": None if site is None else round(site.macro_f1, 4),
        "training_data": source,
        "guardrails_passed": None if guardrails is None else guardrails.passed,
        "guardrail_problems": [] if guardrails is None else list(guardrails.problems),
        "out_of_distribution_check": manifest.ood is not None,
    }
    warnings = []
    if source == "simulated":
        warnings.append(
            "trained on simulated images only: accuracy on this plant's probe is unproven "
            "until it is evaluated on (and ideally retrained with) the plant's own crops"
        )
    elif source == "unknown":
        warnings.append("the manifest does not say what images the model was trained on")
    if guardrails is not None and not guardrails.passed:
        problems = "; ".join(guardrails.problems)
        warnings.append(f"exported with --force past its guardrails: {problems}")
    if manifest.ood is None:
        warnings.append("no out-of-distribution check: non-crystals get a confident class")
    summary["warnings"] = warnings
    return summary


def format_model_quality(manifest: ModelManifest) -> str:
    """One line for logs and doctor: the figures first, then the warnings."""
    quality = describe_model_quality(manifest)
    site = quality["held_out_site_macro_f1"]
    parts = [
        f"validation macro-F1 {quality['validation_macro_f1']:.4f}",
        "held-out site: not measured" if site is None else f"held-out site macro-F1 {site:.4f}",
        f"trained on {quality['training_data']} images",
        "OOD check on" if quality["out_of_distribution_check"] else "OOD check off",
    ]
    return "; ".join(parts + quality["warnings"])


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced a number: every frame row, result, fractions message and
    export names it, so a figure can be traced to the ONNX file behind it."""

    name: str
    version: str
    sha256: str
    """The ONNX file's sha256."""

    @property
    def label(self) -> str:
        """`name:version:sha12`, short enough for a log line or a dashboard tag."""
        return f"{self.name}:{self.version}:{self.sha256[:12]}"

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


class LoadedModel(BaseModel):
    """A manifest together with the verified location of its ONNX file."""

    model_config = ConfigDict(frozen=True)

    directory: Path
    onnx_path: Path
    manifest: ModelManifest

    @property
    def identity(self) -> ModelIdentity:
        manifest = self.manifest
        return ModelIdentity(manifest.name, manifest.version, manifest.onnx_sha256)


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


DETECTOR_MANIFEST = "detector.json"


def default_detector_dir() -> Path:
    """The particle detector shipped inside the package (separation = "learned")."""
    return Path(str(resources.files("monitor") / "models" / "particle-detector"))


def default_model_dir() -> Path:
    """The classifier shipped inside the package (trained on simulator crops)."""
    return Path(str(resources.files("monitor") / "models" / "default"))


def load_manifest(model_dir: Path | None = None, *, verify_hash: bool = True) -> LoadedModel:
    """Read and check a model directory; raise ManifestError naming the fix."""
    directory = Path(model_dir) if model_dir is not None else default_model_dir()
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ManifestError(
            f"model manifest not found: {manifest_path} (point model.path / --model at a "
            "directory made by `python -m model_zoo export`)"
        )
    try:
        manifest = ModelManifest.model_validate(json.loads(manifest_path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ManifestError(f"invalid model manifest {manifest_path}: {exc}") from exc
    onnx_path = directory / manifest.onnx_file
    if not onnx_path.is_file():
        raise ManifestError(f"model file not found: {onnx_path} (re-export the model)")
    if verify_hash:
        actual = sha256_of_file(onnx_path)
        if actual != manifest.onnx_sha256:
            raise ManifestError(
                f"{onnx_path} does not match its manifest (sha256 {actual[:12]}..., manifest "
                f"says {manifest.onnx_sha256[:12]}...): the file was changed or re-exported "
                "without its manifest; export again"
            )
    return LoadedModel(directory=directory, onnx_path=onnx_path, manifest=manifest)
