"""The exit codes of `crystal-monitor` (from sysexits.h) that tell a person's fix from a wait.

The systemd units restart the daemon on 69 (the port may be free, the service back, a
minute later) and not on 78 (nothing changes until someone edits the configuration:
`RestartPreventExitStatus=65 78`).
"""

from __future__ import annotations

EX_UNAVAILABLE = 69  # a service this command needs cannot be reached, or a port bound
EX_CONFIG = 78  # a configuration error: the message names the key to fix
