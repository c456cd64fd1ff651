"""A start-up failure a person fixes: one line naming the setting and the fix, an exit code.

The stages raise it where they find the cause (the web server cannot listen, a probe's
folder cannot be listed, the broker refuses our login); `crystal-monitor run` prints its
line, logs it once at error level and exits with its code, with no traceback unless
`daemon.log_level = "debug"`. It lives with the configuration because its message is
about a configuration key, whichever stage found it.
"""

from __future__ import annotations

import errno

from monitor.config.exit_codes import EX_CONFIG


class StartupError(RuntimeError):
    """`key` is the setting to look at; the message starts with it and ends with the fix.

    `exit_code` is EX_CONFIG (78) when the configuration or the files it names must be
    changed, EX_UNAVAILABLE (69) when something outside it is in the way (a port in use)
    and a restart later may succeed.
    """

    def __init__(self, key: str, problem: str, *, exit_code: int = EX_CONFIG) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.exit_code = exit_code


def describe_bind_error(
    error: OSError, *, host: str, port: int, key: str, host_key: str
) -> tuple[str, str]:
    """(the key to name, the problem and its fix) for a listener that cannot bind
    `host:port`; a StartupError with EX_UNAVAILABLE (69) carries them.

    `key` is the setting that chooses the port and `host_key` the one that chooses the
    address (the same key for an OPC UA endpoint URL).
    """
    where = f"cannot listen on {host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return key, (
            f"{where}: the port is in use by another program (a running crystal-monitor?): "
            f"stop it or set {key} to a free port"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return host_key, (
            f"{where}: {host} is not an address of this host: set {host_key} to one of "
            "its addresses (127.0.0.1 for this host only)"
        )
    if error.errno == errno.EACCES:
        return key, (
            f"{where}: a port below 1024 needs privileges the daemon does not have: set "
            f"{key} to a port of 1024 or above"
        )
    return key, f"{where}: {error.strerror or error} (check {host_key} and {key})"
