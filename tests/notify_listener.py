"""A real unix datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import socket
import time


def _parse(datagram: bytes) -> dict[str, str]:
    text = datagram.decode()
    assert text.endswith("\n")
    return dict(line.split("=", 1) for line in text.splitlines())


class Listener:
    """A bound unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name  # what goes into $NOTIFY_SOCKET

    def receive(self, timeout: float = 2.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        return _parse(self.sock.recv(4096))

    def collect(self, seconds: float) -> list[dict[str, str]]:
        """Every datagram that arrives within `seconds`."""
        received = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                received.append(_parse(self.sock.recv(4096)))
            except TimeoutError:
                break
        return received

    def wait_for(self, key: str, timeout: float) -> tuple[dict[str, str], list[dict[str, str]]]:
        """The first datagram holding `key`, and all datagrams seen before it."""
        seen = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                lines = _parse(self.sock.recv(4096))
            except TimeoutError:
                break
            if key in lines:
                return lines, seen
            seen.append(lines)
        raise AssertionError(f"no {key}= within {timeout} s; saw {seen}")
