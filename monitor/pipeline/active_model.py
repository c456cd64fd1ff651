"""The model the pipeline classifies with, swapped as one piece on a reload."""

from __future__ import annotations

from dataclasses import dataclass, field

from monitor.inference.backend import Backend
from monitor.inference.decision import DecisionRule
from monitor.manifest import LoadedModel, ModelIdentity, ModelManifest


@dataclass(frozen=True)
class ActiveModel:
    """A loaded model, its ready backend and its decision rule.

    A worker reads the pipeline's ActiveModel once per frame and uses it for the whole
    frame (preprocessing, the batcher's backend, the decision), so a frame is never
    prepared for one model and decided by another, whenever a swap lands.
    """

    loaded: LoadedModel
    backend: Backend
    rule: DecisionRule = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", DecisionRule.from_manifest(self.loaded.manifest))

    @property
    def manifest(self) -> ModelManifest:
        return self.loaded.manifest

    @property
    def identity(self) -> ModelIdentity:
        return self.loaded.identity
