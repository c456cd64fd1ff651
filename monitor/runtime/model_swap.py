"""Swapping the classifier while frames flow (a SIGHUP after `model.path` changed).

The candidate is loaded and checked beside the running model, its backend built and
warmed up, and only then handed to the pipeline: frames taken from then on use it,
frames already in a worker finish on the model they started with, and the old backend
is closed once the batcher has delivered its last request. A candidate that fails any
step is refused with the reason; the running model never stops.
"""

from __future__ import annotations

from dataclasses import dataclass

from monitor.manifest import LoadedModel


class ModelSwapError(Exception):
    """The candidate model cannot replace the running one; the message says why."""


@dataclass(frozen=True)
class ModelSwap:
    """What a finished swap replaced, for the log and the systemd status."""

    previous: LoadedModel
    current: LoadedModel

    def describe(self) -> str:
        return f"model swapped: {self.previous.identity.label} -> {self.current.identity.label}"


def candidate_problems(running: LoadedModel, candidate: LoadedModel) -> list[str]:
    """Why `candidate` may not replace `running` (empty when it may). Pure.

    The class list is what the windows, alarms, MQTT fields and OPC UA tags are built
    on, so it must match exactly; a model forced past its export floors, or one without
    the out-of-distribution check the running model has, would lower what the plant is
    told without anyone deciding so.
    """
    problems = []
    old, new = running.manifest, candidate.manifest
    if new.classes != old.classes:
        problems.append(
            f"classes {list(new.classes)} differ from the running {list(old.classes)}: a new "
            "class list needs a restart (windows, alarms and tags are built on it)"
        )
    if new.guardrails is not None and not new.guardrails.passed:
        failed = "; ".join(new.guardrails.problems) or "a floor failed"
        problems.append(
            f"the model was exported past its guardrails ({failed}): export it without "
            "--force, or restart to run it deliberately"
        )
    if old.ood is not None and new.ood is None:
        problems.append(
            "the model has no out-of-distribution check and the running one has: export it "
            "with the OOD score (python -m model_zoo export)"
        )
    if candidate.identity == running.identity:
        problems.append("it is the model already running (same name, version and sha256)")
    return problems
