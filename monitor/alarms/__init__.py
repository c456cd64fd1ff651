"""Alarms: ISA-18.2 alarm states over the windowed statistics of each probe.

Pure logic over values and timestamps passed in by the caller: no I/O, threads or clocks.
`definitions` says what to watch, `readings` what each alarm sees in a snapshot and how
good the probe's input is, `engine` holds the state machine, shelving, suppression, the
journal and the state that survives a restart.
"""

from monitor.alarms.engine import (
    ALLOWED_TRANSITIONS,
    DEFAULT_MAX_SHELVE_S,
    STATE_VERSION,
    ActionResult,
    AlarmEngine,
    AlarmState,
    AlarmStatus,
    Cause,
    JournalEntry,
    JournalEvent,
    Transition,
)
from monitor.alarms.readings import Quality, Reading, limit_of, quality_of, read_alarm
from monitor.config.alarms import (
    DIAGNOSTIC_KINDS,
    PROCESS_KINDS,
    AlarmDefinition,
    AlarmsConfig,
    FractionHighAlarm,
    FractionLowAlarm,
    ImageQualityAlarm,
    OutOfDistributionAlarm,
    Priority,
    ProbeStaleAlarm,
    RateOfChangeAlarm,
    ShiftAlarm,
    UncertainHighAlarm,
    check_definitions,
    ensure_unique_ids,
    format_message,
    is_diagnostic,
    parse_definitions,
    severity_of,
)

__all__ = [
    "ALLOWED_TRANSITIONS",
    "DEFAULT_MAX_SHELVE_S",
    "DIAGNOSTIC_KINDS",
    "PROCESS_KINDS",
    "STATE_VERSION",
    "ActionResult",
    "AlarmDefinition",
    "AlarmEngine",
    "AlarmState",
    "AlarmStatus",
    "AlarmsConfig",
    "Cause",
    "FractionHighAlarm",
    "FractionLowAlarm",
    "ImageQualityAlarm",
    "JournalEntry",
    "JournalEvent",
    "OutOfDistributionAlarm",
    "Priority",
    "ProbeStaleAlarm",
    "Quality",
    "RateOfChangeAlarm",
    "Reading",
    "ShiftAlarm",
    "Transition",
    "UncertainHighAlarm",
    "check_definitions",
    "ensure_unique_ids",
    "format_message",
    "is_diagnostic",
    "limit_of",
    "parse_definitions",
    "quality_of",
    "read_alarm",
    "severity_of",
]
