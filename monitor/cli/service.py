"""The daemon in the foreground, the way systemd runs it: until SIGTERM or SIGINT, with
SIGHUP re-reading the configuration file.

A start-up failure a person must fix (a port in use, a probe folder that cannot be read,
a certificate, the broker refusing our login) ends the process with one plain line on
stderr naming the key and the fix, the same logged once as `startup_failed`, and the
error's exit code: 78 (EX_CONFIG) for the configuration, 69 (EX_UNAVAILABLE) for a port
or service in the way. Its traceback is logged only with `daemon.log_level = "debug"`.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

import structlog

from monitor.config.certificates import check_tls_client_files
from monitor.config.exit_codes import EX_CONFIG
from monitor.config.secrets import SecretError
from monitor.config.settings import Settings
from monitor.config.startup_error import StartupError
from monitor.daemon import Daemon
from monitor.logs import restore_stderr
from monitor.publishers.factory import create_publishers
from monitor.runtime.control import ControlRequests

log = structlog.get_logger(__name__)


def run_daemon(settings: Settings, config_path: Path | None = None) -> int:
    """Run until a stop signal (0), or return a start-up failure's exit code."""
    try:
        _check_tls_files(settings)
        publishers = create_publishers(settings)
    except Exception as exc:
        return _report_or_raise(exc, settings)
    if settings.mqtt.enabled:
        from monitor.publishers.mqtt import MqttPublisher  # noqa: PLC0415 (paho only if used)

        for publisher in publishers:
            if isinstance(publisher, MqttPublisher):
                publisher.refused_login_fails_start = True
    daemon = Daemon(settings, publishers=publishers)
    requests = ControlRequests()
    received: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Flags only, no log line: writing one takes the log writer's lock, which the
        # interrupted main thread may hold (a SIGTERM right after `daemon_started` hung).
        received.append(signal.Signals(signum).name)
        requests.request_stop()

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        requests.request_reload()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Ignored until the daemon can reload: systemd's reload during start-up must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        daemon.start()  # on a failure, what did start is stopped again
    except Exception as exc:
        return _report_or_raise(exc, settings)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        requests.wait(config_path, daemon.reloader.reload)
    finally:
        if received:
            log.info("signal_received", signal=received[0])
        daemon.stop()
    return 0


def _check_tls_files(settings: Settings) -> None:
    """The MQTT client's TLS files, read before start-up: one that cannot be read is named
    by its key (ssl itself would only say that something did not load)."""
    mqtt, tls = settings.mqtt, settings.mqtt.tls
    if not (mqtt.enabled and tls.enabled):
        return
    problems = check_tls_client_files(
        "mqtt.tls", ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file
    )
    if problems:
        key, _, problem = "; ".join(problems).partition(": ")
        raise StartupError(key, problem, exit_code=EX_CONFIG)


def _report_or_raise(exc: Exception, settings: Settings) -> int:
    """A start-up failure's one line and exit code; anything else is a bug: re-raised."""
    failure = _as_startup_error(exc)
    if failure is None:
        raise exc
    debug = settings.daemon.log_level == "debug"
    log.error(
        "startup_failed",
        key=failure.key,
        error=str(failure),
        exit_code=failure.exit_code,
        exc_info=exc if debug else None,
    )
    restore_stderr()  # the plain line below is for a person, as a config error's is
    prefix = "config error" if failure.exit_code == EX_CONFIG else "error"
    print(f"{prefix}: {failure}", file=sys.stderr)
    return failure.exit_code


def _as_startup_error(exc: Exception) -> StartupError | None:
    """`exc` as a StartupError when it is one a person fixes: a secret that cannot be read
    or an MQTT client that cannot be set up name their key at the start of the message."""
    if isinstance(exc, StartupError):
        return exc
    from monitor.publishers.mqtt import MqttSetupError  # noqa: PLC0415 (paho only here)

    if isinstance(exc, SecretError | MqttSetupError):
        key, _, problem = str(exc).partition(": ")
        return StartupError(key, problem, exit_code=EX_CONFIG)
    return None
