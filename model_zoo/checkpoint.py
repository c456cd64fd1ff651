"""Save and load state_dicts as plain tensors, and load initial weights leniently.

Checkpoints hold only tensors so `torch.load(path, weights_only=True)` opens them:
no pickled code runs when a plant user loads a file someone sent them.

`--init PATH` names a state_dict file or a run directory: a pretrain run (its
`encoder.pt`) or a train run (its `checkpoint.pt`). `locate_initial_weights` finds
the file and the `args.json` of the run that wrote it, which says the architecture
the weights fit and the input normalisation they learned on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_zoo.errors import ModelZooError

# The files of a run directory that --init reads (train and pretrain write them).
ARGS_FILE = "args.json"
CHECKPOINT_FILE = "checkpoint.pt"
ENCODER_FILE = "encoder.pt"
PRETRAIN_KIND = "pretrain"
"""args.json's `kind` in a pretrain run; a train run's args.json has none."""

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


Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass(frozen=True)
class InitialWeightsSource:
    """What `--init PATH` names: the state_dict file, and the run that wrote it, if any."""

    path: Path
    """As given: a file or a run directory."""
    file: Path
    """The state_dict that is loaded."""
    run_args: Mapping[str, Any] | None = None
    """The args.json beside `file`, when a model_zoo run wrote it."""

    @property
    def run_dir(self) -> Path | None:
        return self.file.parent if self.run_args is not None else None

    @property
    def kind(self) -> str | None:
        """The run's kind: "pretrain", "train", or None for a bare state_dict file."""
        if self.run_args is None:
            return None
        return str(self.run_args.get("kind") or "train")

    @property
    def arch(self) -> str | None:
        return None if self.run_args is None else str(self.run_args["arch"])

    @property
    def normalisation(self) -> Normalisation | None:
        """(mean, std) the weights learned on, as the run recorded them."""
        spec = None if self.run_args is None else self.run_args.get("input")
        if not isinstance(spec, Mapping) or "mean" not in spec or "std" not in spec:
            return None
        mean, std = (tuple(float(value) for value in spec[key]) for key in ("mean", "std"))
        if len(mean) != 3 or len(std) != 3:
            return None
        return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])

    def describe(self) -> dict[str, object]:
        """The record args.json keeps of the init run."""
        if self.run_args is None:
            return {}
        return {
            "dir": str(self.file.parent.resolve()),
            "kind": self.kind,
            "method": self.run_args.get("method"),
            "arch": self.arch,
            "epochs": self.run_args.get("epochs"),
            "input": self.run_args.get("input"),
        }

    def check_arch(self, arch: str) -> None:
        """Raise naming the fix when the run that wrote the weights used another --arch."""
        if self.arch is None or self.arch == arch:
            return
        made = "pretrained" if self.kind == PRETRAIN_KIND else "trained"
        raise CheckpointError(
            f"--init {self.path} was {made} as --arch {self.arch}, but this run has --arch "
            f"{arch}; its weights fit only the network they were made with: pass --arch "
            f"{self.arch}, or {'pretrain' if made == 'pretrained' else 'train'} again with "
            f"--arch {arch}"
        )


def locate_initial_weights(path: Path) -> InitialWeightsSource:
    """The state_dict `--init PATH` names, with the args.json of its run when there is one."""
    if path.is_dir():
        file = next(
            (path / name for name in (ENCODER_FILE, CHECKPOINT_FILE) if (path / name).is_file()),
            None,
        )
        if file is None:
            raise CheckpointError(
                f"--init directory {path} holds neither {ENCODER_FILE} (a finished pretrain "
                f"run) nor {CHECKPOINT_FILE} (a train run); give a run directory or a "
                "state_dict file"
            )
    elif path.is_file():
        file = path
    else:
        raise CheckpointError(
            f"--init file not found: {path} (give a state_dict file, a pretrain or train run "
            "directory, or --init imagenet or --init scratch)"
        )
    run_args = _read_run_args(file.parent / ARGS_FILE)
    source = InitialWeightsSource(path=path, file=file, run_args=run_args)
    if source.kind == PRETRAIN_KIND and file.name != ENCODER_FILE:
        epochs = run_args.get("epochs") if run_args else None
        raise CheckpointError(
            f"{file} is the pretraining state of an unfinished pretrain run ({epochs} epochs "
            f"asked), not an encoder; finish it by running its pretrain command again (it "
            f"resumes), then give --init {file.parent}"
        )
    return source


def _read_run_args(path: Path) -> Mapping[str, Any] | None:
    """A model_zoo run's args.json (it names an arch), else None."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(loaded, Mapping) or not isinstance(loaded.get("arch"), str):
        return None
    return loaded
