"""Test-wide settings, and the `--require-gpu` gate of `make test-gpu`."""

from __future__ import annotations

import socket
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.notify_listener import Listener

GPU_PASSED = pytest.StashKey[int]()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    """A real unix datagram socket where the daemon's sd_notify messages arrive."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield Listener(sock, str(path))
    sock.close()


@pytest.fixture(autouse=True)
def _no_systemd_notify(monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons started by tests never talk to a systemd that may run the test suite itself;
    tests of the notify protocol set NOTIFY_SOCKET to their own socket."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-gpu",
        action="store_true",
        default=False,
        help="a skipped gpu test fails, and so does a run in which no gpu test passed "
        "(`make test-gpu`: a GPU run must never pass by skipping everything)",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if item.get_closest_marker("gpu") is None or not item.config.getoption("--require-gpu"):
        return report
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"gpu test skipped under --require-gpu: {reason}"
    elif report.passed and report.when == "call":
        item.config.stash[GPU_PASSED] = item.config.stash.get(GPU_PASSED, 0) + 1
    return report


def _no_gpu_test_passed(config: pytest.Config) -> bool:
    return bool(config.getoption("--require-gpu")) and config.stash.get(GPU_PASSED, 0) == 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _no_gpu_test_passed(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    if _no_gpu_test_passed(config):
        terminalreporter.write_line("--require-gpu: no gpu test passed", red=True)
