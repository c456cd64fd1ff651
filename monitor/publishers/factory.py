"""The publishers the configuration enables; heavy imports only for those used."""

from __future__ import annotations

from monitor import __version__
from monitor.config.settings import Settings
from monitor.publishers.base import Publisher


def create_publishers(settings: Settings) -> list[Publisher]:
    publishers: list[Publisher] = []
    if settings.mqtt.enabled:
        from monitor.publishers.mqtt import MqttPublisher  # noqa: PLC0415

        probes = [probe.id for probe in settings.probes]
        publishers.append(
            MqttPublisher(
                settings.mqtt, settings.daemon.state_dir, version=__version__, probes=probes
            )
        )
    if settings.opcua.enabled:
        from monitor.publishers.opcua import OpcUaPublisher  # noqa: PLC0415

        publishers.append(OpcUaPublisher(settings.opcua, settings.daemon.state_dir))
    return publishers
