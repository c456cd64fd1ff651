"""The "not a crystal" score: Mahalanobis distance in the classifier's own feature space.

The softmax of a trained network is confident on almost anything (photos, text and
noise get 0.99), so the top probability cannot say "I don't know". The penultimate
embedding can: crops like the training crops land near their class mean, other
images far from every class mean. Following Lee et al. (2018), the class means and one
shared covariance are fitted on the training features; the covariance is shrunk
towards a scaled identity with the Ledoit-Wolf intensity, since a 1280-wide
embedding fitted on a few thousand crops is otherwise near singular. The score of a
crop is its distance to the nearest class mean, and the threshold is the validation
quantile that rejects the stated share of in-distribution crops.

The scoring is built into the exported graph (`ScoredClassifier`): the ONNX model's
output is the class probabilities followed by the score, so every backend (ONNX
Runtime, TensorRT) returns it with no extra code and the daemon stays torch-free.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model_zoo.errors import ModelZooError
from monitor.manifest import InputSpec
from monitor.preprocess import prepare_batch

DEFAULT_FALSE_REJECT_RATE = 0.01


class OodError(ModelZooError):
    """The out-of-distribution score could not be fitted."""


def split_head(network: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(a copy of the network that returns the penultimate embedding, its last Linear).

    The last nn.Linear registered in the network is its classifier head (true for every
    architecture in the registry: torchvision's `fc`/`classifier[-1]`, Lite's `_fc`).
    """
    features = copy.deepcopy(network)
    named = [(name, module) for name, module in features.named_modules() if name]
    linears = [(name, module) for name, module in named if isinstance(module, nn.Linear)]
    if not linears:
        raise OodError(f"{type(network).__name__} has no nn.Linear head to split off")
    name, head = linears[-1]
    parent_name, _, attribute = name.rpartition(".")
    parent = features.get_submodule(parent_name) if parent_name else features
    setattr(parent, attribute, nn.Identity())
    assert isinstance(head, nn.Linear)
    return features, head


@dataclass(frozen=True)
class MahalanobisFit:
    """Class means and the whitening of the shared, shrunk covariance."""

    centre: np.ndarray  # (D,) mean of all training features
    means: np.ndarray  # (C, D) class means
    whitening: np.ndarray  # (D, D): z = (f - centre) @ whitening has identity covariance
    shrinkage: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) distance to the nearest class mean, in whitened units."""
        whitened = (features - self.centre) @ self.whitening
        means = (self.means - self.centre) @ self.whitening
        squared = ((whitened[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
        return np.sqrt(squared.min(axis=1))

    def digest(self) -> str:
        """sha256 over the fitted arrays, recorded in the manifest."""
        hasher = hashlib.sha256()
        for array in (self.centre, self.means, self.whitening):
            hasher.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        return hasher.hexdigest()


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, n_classes: int) -> MahalanobisFit:
    """Fit class means and the Ledoit-Wolf-shrunk shared covariance of the residuals."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise OodError(f"features {features.shape} and labels {labels.shape} do not match")
    missing = [c for c in range(n_classes) if not np.any(labels == c)]
    if missing:
        raise OodError(f"no training features for classes {missing}; cannot fit class means")
    means = np.stack([features[labels == c].mean(axis=0) for c in range(n_classes)])
    residuals = features - means[labels]
    covariance, shrinkage = ledoit_wolf(residuals)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    floor = max(float(eigenvalues.max()) * 1e-9, 1e-12)
    whitening = eigenvectors / np.sqrt(np.maximum(eigenvalues, floor))[None, :]
    return MahalanobisFit(
        centre=features.mean(axis=0),
        means=means,
        whitening=whitening,
        shrinkage=shrinkage,
    )


def ledoit_wolf(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """Shrunk covariance (1 - a) S + a mu I of zero-mean rows, and the intensity a.

    Ledoit & Wolf (2004): a = min(b2, d2) / d2 with d2 = ||S - mu I||^2 and b2 the mean
    squared distance of the rank-one sample terms from S, over n^2.
    """
    n, dim = centred.shape
    if n < 2:
        raise OodError("need at least two training crops to fit a covariance")
    sample = centred.T @ centred / n
    mu = float(np.trace(sample)) / dim
    d2 = float(((sample - mu * np.eye(dim)) ** 2).sum())
    # sum_k ||x_k x_k^T - S||^2 = sum_k ||x_k||^4 - n ||S||^2
    norms = (centred**2).sum(axis=1)
    b2_bar = (float((norms**2).sum()) - n * float((sample**2).sum())) / (n * n)
    shrinkage = 1.0 if d2 <= 0 else min(max(b2_bar, 0.0), d2) / d2
    covariance = (1.0 - shrinkage) * sample + shrinkage * mu * np.eye(dim)
    return covariance, float(shrinkage)


def calibrate_threshold(scores: np.ndarray, false_reject_rate: float) -> float:
    """The score above which `false_reject_rate` of these in-distribution scores lie."""
    if not 0.0 < false_reject_rate < 1.0:
        raise OodError(f"false-reject rate must be in (0, 1), got {false_reject_rate}")
    if len(scores) == 0:
        raise OodError("no validation crops to calibrate the out-of-distribution threshold")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - false_reject_rate))


class ScoredClassifier(nn.Module):
    """Probabilities, then the out-of-distribution score, as one (N, C + 1) output.

    One output tensor keeps every backend unchanged (TensorRT binds one input and one
    output); the manifest's `output` says the last column is the score.
    """

    def __init__(self, network: nn.Module, fit: MahalanobisFit) -> None:
        super().__init__()
        self.features, self.head = split_head(network)
        whitening = torch.from_numpy(fit.whitening.astype(np.float32))
        centre = torch.from_numpy(fit.centre.astype(np.float32))
        means = torch.from_numpy(((fit.means - fit.centre) @ fit.whitening).astype(np.float32))
        self.register_buffer("centre", centre)
        self.register_buffer("whitening", whitening)
        self.register_buffer("whitened_means", means)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embedding = self.features(images)
        probabilities = torch.softmax(self.head(embedding), dim=1)
        whitened = (embedding - self.centre) @ self.whitening
        difference = whitened.unsqueeze(1) - self.whitened_means.unsqueeze(0)
        distance = (difference * difference).sum(dim=2).min(dim=1).values.sqrt()
        return torch.cat((probabilities, distance.unsqueeze(1)), dim=1)


@torch.no_grad()
def embed_images(
    network: nn.Module,
    images: Sequence[np.ndarray],
    spec: InputSpec,
    *,
    batch_size: int = 128,
) -> np.ndarray:
    """Penultimate embeddings of un-augmented crops, preprocessed as the daemon does."""
    features, _ = split_head(network)
    features.eval()
    chunks = [
        features(torch.from_numpy(prepare_batch(images[start : start + batch_size], spec)))
        .double()
        .numpy()
        for start in range(0, len(images), batch_size)
    ]
    if not chunks:
        raise OodError("no images to embed")
    return np.concatenate(chunks)
