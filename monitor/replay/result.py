"""What a replay takes in and gives out: the recorded frames, the result the report is
drawn from, and the error a replay stops with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.config.alarms import AlarmDefinition
from monitor.config.settings import ProbeConfig, Settings
from monitor.publishers.base import ProbeUpdate

EX_USAGE = 64  # sysexits.h: a bad option value (unknown probe id)
EX_NOINPUT = 66  # no such folder, or no frames in it
EX_CANTCREAT = 73  # the report cannot be written


class ReplayError(Exception):
    """A replay that cannot run; the message names the fix, `exit_code` the sysexits code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class RecordedFrame:
    """One file of the recorded batch and the time it was taken."""

    path: str
    key: str  # path relative to the batch folder, as the folder source keys files
    ts: float
    ts_from_name: bool  # False: the file's mtime stood in for a stamp in its name


@dataclass
class ReplayResult:
    """Everything the report needs: what went in, what the daemon published, how long."""

    folder: Path
    probe: ProbeConfig
    settings: Settings
    definitions: tuple[AlarmDefinition, ...]  # the alarms that watch this probe
    model_name: str
    model_sha256: str
    classes: tuple[str, ...]
    frames: int
    frames_without_stamp: int
    first_ts: float
    last_ts: float
    results: list[dict[str, Any]]
    updates: list[ProbeUpdate]
    events: list[dict[str, Any]]
    lost_frames: int  # fed but never recorded (inference failed; the daemon logged why)
    speed: float | None  # None: as fast as possible
    wall_s: float = 0.0
    config_path: Path | None = None  # shown in the report

    @property
    def alarm_events(self) -> list[dict[str, Any]]:
        """The announced alarm transitions, in time order."""
        return [event for event in self.events if event.get("type") == "alarm"]
