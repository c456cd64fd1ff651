"""The "not a crystal" score: Mahalanobis distances in the classifier's own feature space.

The softmax of a trained network is confident on almost anything (photos, text and
noise get 0.99), so the top probability cannot say "I don't know". Its features can:
crops like the training crops land near their class mean, other images far from every
class mean. Following Lee et al. (2018), the class means and one shared covariance are
fitted on the training features of several layers; each covariance is shrunk towards a
scaled identity with the Ledoit-Wolf intensity, since a 1280-wide embedding fitted on
a few thousand crops is otherwise near singular.

Which layers: the penultimate embedding, fine-tuned to separate CEX from PG, forgets
what is not a crystal (flat fields, noise, checkerboards and text all landed near the
class means: 19 % of the out-of-distribution set flagged, measured on the Lite0 model).
The mean and standard deviation per channel of intermediate blocks keep the texture
statistics that tell a probe crop from a photo or a screen. Measured on the same model
and sets (3,000 training crops fitted, 1 % false rejects on validation): block 7 alone
98.1 % flagged, blocks 7 and 10 98.9 %, blocks 4, 7, 10, 14 97.4 %, and adding the
embedding to any of them lowers the rate (95-97 %). The default is therefore blocks at
45 % and 65 % of the depth (Lite0's 7 and 10), with the embedding only for a network
whose blocks are not known here. Each layer's distance is divided by its own
validation 99th percentile, the score is the largest of these ratios, and the
threshold on it is the validation quantile that rejects the stated share of
in-distribution crops.

The scoring is built into the exported graph (`ScoredClassifier`): the ONNX model's
output is the class probabilities followed by the score, so every backend (ONNX
Runtime, TensorRT) returns it with no extra code and the daemon stays torch-free.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model_zoo.errors import ModelZooError
from monitor.imaging.preprocess import prepare_batch
from monitor.manifest import InputSpec

DEFAULT_FALSE_REJECT_RATE = 0.01
# Intermediate blocks whose output statistics make the score, as fractions of the depth
# of the network's block list (Lite0's 16 blocks: 7 and 10).
TAP_DEPTHS = (0.45, 0.65)
EMBEDDING = "embedding"
"""The layer name of the penultimate embedding (the input of the head)."""
# Smallest covariance eigenvalue kept, relative to the largest.
CONDITION_FLOOR = 1e-4
# Each layer's distance is scaled by this validation quantile before the maximum.
LAYER_SCALE_QUANTILE = 0.99


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


def scored_layers(network: nn.Module) -> list[str]:
    """The layers whose features make the score: module names, or EMBEDDING.

    EfficientNet-Lite's `_blocks`, torchvision's `features` (MobileNet, EfficientNet)
    and ResNet's middle stages; any other network is scored on its embedding.
    """
    modules = dict(network.named_modules())
    for container in ("_blocks", "features"):
        blocks = modules.get(container)
        if isinstance(blocks, nn.ModuleList | nn.Sequential) and len(blocks) >= 4:
            count = len(blocks)
            indices = sorted({min(count - 1, int(count * depth)) for depth in TAP_DEPTHS})
            return [f"{container}.{index}" for index in indices]
    stages = [name for name in ("layer2", "layer3") if name in modules]
    return stages or [EMBEDDING]


def _channel_statistics(activation: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 2C): each channel's spatial mean and standard deviation."""
    mean = activation.mean(dim=(2, 3))
    centred = activation - mean[:, :, None, None]
    deviation = (centred * centred).mean(dim=(2, 3)).add(1e-6).sqrt()
    return torch.cat((mean, deviation), dim=1)


class TappedFeatures(nn.Module):
    """The network without its head: forward returns (features of each layer, embedding),
    a layer's features being its channel statistics, or the embedding for EMBEDDING."""

    def __init__(self, network: nn.Module, layers: list[str]) -> None:
        super().__init__()
        self.body, self.head = split_head(network)
        self.layers = list(layers)
        self._captured: dict[str, torch.Tensor] = {}
        for name in self.layers:
            if name != EMBEDDING:
                self.body.get_submodule(name).register_forward_hook(self._capture(name))

    def _capture(self, name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            self._captured[name] = output

        return hook

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        self._captured.clear()
        embedding = self.body(images)
        features = [
            embedding if name == EMBEDDING else _channel_statistics(self._captured[name])
            for name in self.layers
        ]
        return features, embedding


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
    # A floor on the condition number: directions with almost no training variance would
    # otherwise amplify float32 rounding in the exported graph into the score.
    floor = max(float(eigenvalues.max()) * CONDITION_FLOOR, 1e-12)
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


@dataclass(frozen=True)
class LayeredFit:
    """One Mahalanobis fit per feature layer, each with its validation scale."""

    layers: list[str]  # module names, or EMBEDDING
    fits: list[MahalanobisFit]
    scales: list[float]

    def score(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Largest per-layer distance / scale, per image."""
        ratios = [
            fit.score(layer) / scale
            for fit, layer, scale in zip(self.fits, features, self.scales, strict=True)
        ]
        return np.max(np.stack(ratios), axis=0)

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for fit, scale in zip(self.fits, self.scales, strict=True):
            hasher.update(fit.digest().encode())
            hasher.update(np.float64(scale).tobytes())
        return hasher.hexdigest()

    @property
    def shrinkage(self) -> float:
        """The largest shrinkage intensity over the layers (the manifest's summary)."""
        return max(fit.shrinkage for fit in self.fits)

    @property
    def dims(self) -> int:
        return int(sum(fit.centre.shape[0] for fit in self.fits))


def fit_layers(
    layers: list[str],
    train: Sequence[np.ndarray],
    labels: np.ndarray,
    validation: Sequence[np.ndarray],
    n_classes: int,
) -> LayeredFit:
    """Fit each layer on the training features and scale it by its validation quantile."""
    fits = [fit_mahalanobis(features, labels, n_classes) for features in train]
    scales = [
        max(float(np.quantile(fit.score(features), LAYER_SCALE_QUANTILE)), 1e-9)
        for fit, features in zip(fits, validation, strict=True)
    ]
    return LayeredFit(layers=layers, fits=fits, scales=scales)


class ScoredClassifier(nn.Module):
    """Probabilities, then the out-of-distribution score, as one (N, C + 1) output.

    One output tensor keeps every backend unchanged (TensorRT binds one input and one
    output); the manifest's `output` says the last column is the score.
    """

    def __init__(self, network: nn.Module, fit: LayeredFit) -> None:
        super().__init__()
        self.features = TappedFeatures(network, fit.layers)
        for index, (layer_fit, scale) in enumerate(zip(fit.fits, fit.scales, strict=True)):
            whitening = layer_fit.whitening / scale
            means = (layer_fit.means - layer_fit.centre) @ whitening
            self.register_buffer(f"centre_{index}", _float32(layer_fit.centre))
            self.register_buffer(f"whitening_{index}", _float32(whitening))
            self.register_buffer(f"means_{index}", _float32(means))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        layers, embedding = self.features(images)
        probabilities = torch.softmax(self.features.head(embedding), dim=1)
        ratios = []
        for index, layer in enumerate(layers):
            centre = getattr(self, f"centre_{index}")
            whitening = getattr(self, f"whitening_{index}")
            means = getattr(self, f"means_{index}")
            difference = ((layer - centre) @ whitening).unsqueeze(1) - means.unsqueeze(0)
            ratios.append((difference * difference).sum(dim=2).min(dim=1).values.sqrt())
        score = torch.stack(ratios, dim=1).max(dim=1).values
        return torch.cat((probabilities, score.unsqueeze(1)), dim=1)


def _float32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


@torch.no_grad()
def embed_images(
    network: nn.Module,
    images: Sequence[np.ndarray],
    spec: InputSpec,
    *,
    layers: Sequence[str] = (EMBEDDING,),
    batch_size: int = 128,
) -> list[np.ndarray]:
    """Features of un-augmented crops, preprocessed as the daemon does, one array per
    layer in `layers`."""
    features = TappedFeatures(network, list(layers))
    features.eval()
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(prepare_batch(images[start : start + batch_size], spec))
        chunks.append([layer.double().numpy() for layer in features(batch)[0]])
    if not chunks:
        raise OodError("no images to embed")
    return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))]
