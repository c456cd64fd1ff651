"""The model manifest: an exported classifier describes itself.

`model_zoo` writes `manifest.json` beside `model.onnx`; the daemon and `classify`
read every preprocessing detail from it and hard-code none (the idea of timm's
`PretrainedCfg` and torchvision's `Weights`).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Literal

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


class ModelManifest(BaseModel):
    """Everything the daemon needs to run an exported classifier correctly."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Manifest schema.")
    name: str = Field(min_length=1, description="Model name, e.g. cex-pg-mobilenetv3.")
    version: str = Field(min_length=1, description="Model version.")
    architecture: str = Field(description="model_zoo registry name of the network.")
    classes: tuple[str, ...] = Field(min_length=2, description="Class names in output order.")
    input: InputSpec
    output: Literal["probabilities"] = Field(
        default="probabilities", description="The ONNX output is softmax probabilities."
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
    training_command: str = Field(description="The command line that trained the checkpoint.")
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
        for label, metrics in (("validation", self.validation), ("test", self.test)):
            if metrics is None:
                continue
            matrix = metrics.confusion_matrix
            if len(matrix) != n or any(len(row) != n for row in matrix):
                raise ValueError(f"{label}.confusion_matrix must be {n} x {n} (one row per class)")
        return self


class LoadedModel(BaseModel):
    """A manifest together with the verified location of its ONNX file."""

    model_config = ConfigDict(frozen=True)

    directory: Path
    onnx_path: Path
    manifest: ModelManifest


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
