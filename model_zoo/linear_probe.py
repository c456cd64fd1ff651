"""How good is a frozen encoder: the linear-probe accuracy on a labelled ImageFolder.

The standard yardstick of self-supervised pretraining (SimCLR's tables report it
first): freeze the encoder, compute its penultimate features (the input of the
classifier head) of the un-augmented crops, fit a multinomial logistic regression on
the train split's features and report accuracy, macro-F1 and per-class recall on the
validation and test splits. Nothing of the encoder changes, so the figure says what
the pretraining alone learned, and it takes seconds where fine-tuning takes minutes.

The encoder is a pretrain run (its encoder.pt), a train run (its checkpoint.pt) or a
state_dict file; crops are prepared as the daemon prepares them, with the input
normalisation the run recorded.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from model_zoo.checkpoint import (
    InitialWeightsSource,
    load_initial_weights,
    locate_initial_weights,
)
from model_zoo.errors import ModelZooError
from model_zoo.imagefolder import DEFAULT_FRACTIONS, DatasetError, load_images, resolve_splits
from model_zoo.metrics import compute_metrics
from model_zoo.ood import split_head
from model_zoo.registry import create_model, input_normalisation, list_models
from model_zoo.training import resolve_device, seed_everything
from monitor.imaging.preprocess import prepare_batch
from monitor.manifest import EvaluationMetrics, InputSpec

LINEAR_PROBE_FILE = "linear_probe.json"
DEFAULT_INPUT_SIZE = 96
# L-BFGS iterations for the logistic regression; it is convex and converges well within.
PROBE_ITERATIONS = 300


@dataclass(frozen=True)
class LinearProbeReport:
    """A frozen encoder's linear probe on one labelled folder."""

    weights: Path
    arch: str
    origin: str
    """"pretrain run", "train run" or "state_dict file"."""
    data_dir: Path
    classes: tuple[str, ...]
    input: InputSpec
    feature_dim: int
    train_images: int
    train: EvaluationMetrics
    """The fit on its own training features (how separable they are at all)."""
    evaluations: dict[str, EvaluationMetrics]
    """Held-out splits by name: validation, and test when the folder has one."""

    def to_json(self) -> dict[str, object]:
        return {
            "weights": str(self.weights.resolve()),
            "arch": self.arch,
            "origin": self.origin,
            "data_dir": str(self.data_dir.resolve()),
            "classes": list(self.classes),
            "input": self.input.model_dump(mode="json"),
            "feature_dim": self.feature_dim,
            "train_images": self.train_images,
            "train": self.train.model_dump(),
            **{name: metrics.model_dump() for name, metrics in self.evaluations.items()},
        }


def run_linear_probe(
    encoder: Path,
    data_dir: Path,
    *,
    arch: str | None = None,
    input_size: int | None = None,
    resize: Literal["letterbox", "stretch"] | None = None,
    layout: Literal["auto", "class-folders", "split-folders"] = "auto",
    split: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    batch_size: int = 64,
    threads: int = 0,
    device: str = "auto",
    out_dir: Path | None = None,
) -> LinearProbeReport:
    """Fit a linear classifier on the frozen encoder's features of the train split and
    measure it on the other splits; `out_dir` gets linear_probe.json."""
    source = locate_initial_weights(encoder)
    resolved_arch = _resolve_arch(source, arch)
    spec = _resolve_input(source, resolved_arch, input_size, resize)
    splits = resolve_splits(data_dir, layout, split, seed)
    held_out = {name: files for name, files in splits.named_splits() if name != "train" and files}
    if not splits.train or not held_out:
        raise DatasetError(
            f"{data_dir} needs a train split and a validation or test split for a linear "
            "probe (give train/ and val/ folders, or class folders to split)"
        )
    torch_threads = threads or os.cpu_count() or 1
    torch.set_num_threads(torch_threads)
    seed_everything(seed)
    torch_device = resolve_device(device)

    network = create_model(resolved_arch, len(splits.classes))
    report = load_initial_weights(network, source.file)
    print(report.describe(), file=sys.stderr)
    body, head = split_head(network)
    body.to(torch_device).eval()

    loaded = {
        name: load_images(files, threads=torch_threads, description=f"decode {name}")
        for name, files in [("train", splits.train), *held_out.items()]
    }
    for name, images in loaded.items():
        for path, reason in images.unreadable:
            print(f"skipped unreadable {name} image {path}: {reason}", file=sys.stderr)
    features = {
        name: extract_features(body, images.images, spec, batch_size, torch_device)
        for name, images in loaded.items()
    }
    train_labels = loaded["train"].labels
    if len(np.unique(train_labels)) < 2:
        raise DatasetError(f"the train split of {data_dir} has images of fewer than 2 classes")
    mean, scale = standardisation(features["train"])
    classifier = fit_logistic_regression(
        (features["train"] - mean) / scale, torch.from_numpy(train_labels), len(splits.classes)
    )

    def measure(name: str) -> EvaluationMetrics:
        with torch.no_grad():
            predicted = classifier((features[name] - mean) / scale).argmax(1).numpy()
        return compute_metrics(loaded[name].labels, predicted, splits.classes)

    result = LinearProbeReport(
        weights=source.file,
        arch=resolved_arch,
        origin=f"{source.kind} run" if source.kind else "state_dict file",
        data_dir=data_dir,
        classes=splits.classes,
        input=spec,
        feature_dim=head.in_features,
        train_images=len(train_labels),
        train=measure("train"),
        evaluations={name: measure(name) for name in held_out},
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / LINEAR_PROBE_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


@torch.no_grad()
def extract_features(
    body: nn.Module,
    images: Sequence[np.ndarray],
    spec: InputSpec,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """(N, D) penultimate features on the CPU, images prepared as the daemon does."""
    body.eval()
    chunks = [
        body(torch.from_numpy(prepare_batch(images[start : start + batch_size], spec)).to(device))
        .float()
        .cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).flatten(1)


def standardisation(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and scale of the training features.

    The scale has a floor (a thousandth of the mean scale): a feature constant on the
    training crops would otherwise blow up whatever it does on the others.
    """
    mean = features.mean(0)
    std = features.std(0, unbiased=False)
    return mean, std.clamp_min(1e-3 * float(std.mean()) + 1e-12)


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS, classes weighted to balance.

    The L2 penalty is scikit-learn's LogisticRegression default (C = 1): 0.5 |W|^2
    against the summed loss. Zero start: the problem is convex, so the result does not
    depend on a seed.
    """
    count, width = features.shape
    layer = nn.Linear(width, num_classes)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).float()
    class_weights = counts.sum() / (num_classes * counts)
    optimizer = torch.optim.LBFGS(
        layer.parameters(), lr=1.0, max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe"
    )
    penalty = 0.5 / count

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(layer(features), labels, weight=class_weights)
        loss = loss + penalty * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return layer.eval()


def _resolve_arch(source: InitialWeightsSource, arch: str | None) -> str:
    if arch is None:
        if source.arch is None:
            raise ModelZooError(
                f"{source.file} is a bare state_dict: give its --arch (one of "
                f"{', '.join(list_models())})"
            )
        return source.arch
    source.check_arch(arch)
    return arch


def _resolve_input(
    source: InitialWeightsSource,
    arch: str,
    input_size: int | None,
    resize: Literal["letterbox", "stretch"] | None,
) -> InputSpec:
    """The run's recorded input spec, with any size or resize given overriding it."""
    recorded = source.run_args.get("input") if source.run_args else None
    mean, std = source.normalisation or input_normalisation(arch)
    size = input_size or (recorded or {}).get("size") or DEFAULT_INPUT_SIZE
    policy = resize or (recorded or {}).get("resize") or "letterbox"
    return InputSpec(size=size, resize=policy, mean=mean, std=std)
