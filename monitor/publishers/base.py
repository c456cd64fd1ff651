"""The seam between the daemon and its publishers.

The daemon calls a Publisher from its publish loop and its recorder thread; a
publisher must never block them for long (queue internally and return). Operator
commands arriving through a publisher (MQTT command topics, OPC UA methods) go back
through the CommandHandler, which the daemon implements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from monitor.alarms import Quality
from monitor.manifest import ModelIdentity

if TYPE_CHECKING:
    from monitor.store import StoreTransaction


@dataclass(frozen=True)
class ProbeUpdate:
    """Everything a publisher shows about one probe at one publish interval.

    `snapshot` is `ProbeSnapshot.to_json()` of monitor.aggregate: {"ts", "batch",
    "windows": {"60": {"n", "n_uncertain", "frames", "rejected_frames",
    "rejected_by_reason", "rejected_share", "uncertain_share", "n_ood", "ood_share",
    "particles_per_min",
    "frames_per_min", "classes": {name: {"n", "fraction", "ci95", "adjusted",
    "effective_n"}}, "sizes": {"unit", "measure", "bin_edges", "classes": {name: {"count",
    "d10", "d50", "d90", "d10_sq", "d50_sq", "d90_sq", "mean_aspect_ratio",
    "histogram"}}}}, ...}, "trend": {name: {"ewma", "slope_per_min"}}}.
    `alarms` is the list of alarm statuses (AlarmStatus.to_json() of monitor.alarms).
    """

    probe: str
    ts: float  # epoch seconds
    batch: str | None
    quality: Quality
    model: ModelIdentity
    """The model of the newest frame counted (the running model before any frame)."""
    classes: tuple[str, ...]
    snapshot: dict[str, Any]
    last_frame_ts: float | None
    alarms: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class CommandResult:
    accepted: bool
    reason: str | None = None


class CommandHandler(Protocol):
    """Operator actions, implemented by the daemon; every call answers accepted or why not."""

    def acknowledge(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult: ...

    def shelve(
        self,
        probe: str,
        alarm_id: str,
        minutes: float,
        who: str,
        comment: str,
        *,
        one_shot: bool = False,
    ) -> CommandResult:
        """Shelve for `minutes`; `one_shot`: until the alarm is no longer active, at most
        that long (and alarms.max_shelve)."""
        ...

    def unshelve(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        """End a shelve now (OPC UA Unshelve)."""
        ...

    def add_comment(self, probe: str, alarm_id: str, who: str, comment: str) -> CommandResult:
        """Journal a comment on an alarm (OPC UA AddComment); no state changes."""
        ...

    def start_batch(
        self, probe: str, batch_id: str, who: str, *, end_running: bool = False
    ) -> CommandResult:
        """Refused while a batch runs, unless `end_running` (which stops it first)."""
        ...

    def stop_batch(self, probe: str, who: str) -> CommandResult: ...


class Publisher(Protocol):
    name: str

    def start(self, commands: CommandHandler) -> None:
        """Connect / listen; must return promptly (work continues on own threads)."""
        ...

    def publish_update(self, update: ProbeUpdate) -> None:
        """Current state of a probe, every publish interval."""
        ...

    def publish_alarms(self, probe: str, alarms: list[dict[str, Any]]) -> None:
        """Every alarm status of a probe right after an operator action (acknowledge,
        shelve), so each interface shows it at once, not at the next publish interval.
        `publish_update` carries the same statuses every interval."""
        ...

    def publish_event(self, probe: str, event: dict[str, Any]) -> None:
        """An alarm transition or batch start/stop (must not be lost)."""
        ...

    def publish_result(self, probe: str, result: dict[str, Any]) -> None:
        """One frame's result (optional stream; off by default)."""
        ...

    def health(self) -> tuple[bool, str]: ...

    def stop(self) -> None:
        """Publish what a clean stop must (e.g. MQTT 'offline'), then disconnect."""
        ...


@runtime_checkable
class DurableResults(Protocol):
    """A publisher whose per-frame results must be kept exactly as the frames are.

    The recorder calls `stage_result` inside the store transaction that records the
    frame (`tx` is a `monitor.store.StoreTransaction`), so the result message commits
    with the frame row or not at all; `publish_result` is then not called for it.
    """

    def stage_result(self, tx: StoreTransaction, probe: str, result: dict[str, Any]) -> None: ...
