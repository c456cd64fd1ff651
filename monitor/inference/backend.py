"""The seam between the pipeline and whatever runs the network (the choice: `factory`)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

DEFAULT_MAX_BATCH = 32


class BackendUnavailableError(Exception):
    """A backend that cannot run on this host; the message names the fix."""


class Backend(Protocol):
    """Runs a classifier on a prepared batch and returns class probabilities."""

    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, C) float32 probabilities, rows summing to 1."""
        ...

    def close(self) -> None:
        """Release sessions, engines and device memory."""
        ...


class PendingResult(Protocol):
    def wait(self) -> np.ndarray:
        """Block until the submitted batch is done; its (N, C) probabilities."""
        ...


@runtime_checkable
class PipelinedBackend(Protocol):
    """A backend that can take the next batch while the current one still runs (TensorRT)."""

    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...

    def submit(self, batch: np.ndarray) -> PendingResult:
        """Start inference of up to max_batch crops and return without waiting."""
        ...
