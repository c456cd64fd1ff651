"""Save and load state_dicts as plain tensors, and load initial weights leniently.

Checkpoints hold only tensors so `torch.load(path, weights_only=True)` opens them:
no pickled code runs when a plant user loads a file someone sent them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model_zoo.errors import ModelZooError

# Wrappers other training scripts put around a state_dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


class CheckpointError(ModelZooError):
    """A weights file that cannot be used."""


@dataclass
class InitialWeightsReport:
    """What `load_initial_weights` did with each tensor in the file."""

    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"initial weights: loaded {len(self.loaded)} tensors"]
        if self.shape_mismatch:
            lines.append(
                f"  skipped {len(self.shape_mismatch)} with a different shape (kept freshly "
                "initialised, e.g. a head for another class count): "
                + ", ".join(self.shape_mismatch)
            )
        if self.missing:
            lines.append(f"  {len(self.missing)} not in the file: {_abbreviate(self.missing)}")
        if self.unexpected:
            lines.append(
                f"  {len(self.unexpected)} in the file but not in the model: "
                f"{_abbreviate(self.unexpected)}"
            )
        return "\n".join(lines)


def extract_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's state, safe to keep while training goes on."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


def save_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write atomically, so a crash never leaves a half-written best checkpoint."""
    partial = path.with_name(path.name + ".partial")
    torch.save(dict(state), partial)
    partial.replace(path)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensors-only state_dict, unwrapping {'state_dict': ...} and 'module.' prefixes."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} as a tensors-only state_dict ({exc}); save it with "
            "torch.save(model.state_dict(), path)"
        ) from exc
    for key in _NESTED_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise CheckpointError(
            f"{path} is not a state_dict (a mapping of names to tensors); save it with "
            "torch.save(model.state_dict(), path)"
        )
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def load_initial_weights(model: nn.Module, path: Path) -> InitialWeightsReport:
    """Copy every tensor whose name and shape match; report the rest.

    A file from the same architecture with a different head (ImageNet's 1000
    classes, or last site's two) loads everything but the head, which stays at
    its fresh initialisation.
    """
    source = load_state_dict(path)
    target = model.state_dict()
    report = InitialWeightsReport()
    matched: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(key)
        elif target[key].shape != value.shape:
            report.shape_mismatch.append(
                f"{key} {tuple(value.shape)} -> {tuple(target[key].shape)}"
            )
        else:
            matched[key] = value
            report.loaded.append(key)
    report.missing = [key for key in target if key not in source]
    if not matched:
        raise CheckpointError(
            f"none of the {len(source)} tensors in {path} fit this model; is it a checkpoint "
            "of a different --arch?"
        )
    model.load_state_dict(matched, strict=False)
    return report


def _abbreviate(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"
