"""Test-wide settings."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_systemd_notify(monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons started by tests never talk to a systemd that may run the test suite itself;
    tests of the notify protocol set NOTIFY_SOCKET to their own socket."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
