"""Publishers: how the plant sees the numbers (MQTT, OPC UA)."""

from monitor.publishers.base import CommandHandler, CommandResult, ProbeUpdate, Publisher

__all__ = ["CommandHandler", "CommandResult", "ProbeUpdate", "Publisher"]
