"""Events the plant is told about (alarm transitions, batch start and stop): logged,
then handed to every publisher."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from monitor.alarms import Transition
from monitor.publishers.base import Publisher

log = structlog.get_logger(__name__)


class EventAnnouncer:
    def __init__(self, publishers: Sequence[Publisher]) -> None:
        self._publishers = tuple(publishers)

    def announce(self, probe: str, event: dict[str, Any]) -> None:
        log.info("event", probe=probe, **{k: v for k, v in event.items() if k != "probe"})
        for publisher in self._publishers:
            publisher.publish_event(probe, event)

    def announce_alarm_states(self, probe: str, alarms: list[dict[str, Any]]) -> None:
        """The probe's alarm statuses after an operator action, to every publisher now."""
        for publisher in self._publishers:
            publisher.publish_alarms(probe, alarms)

    def announce_transitions(self, probe: str, transitions: Sequence[Transition]) -> None:
        for transition in transitions:
            self.announce(probe, {"type": "alarm", **transition.to_json()})
