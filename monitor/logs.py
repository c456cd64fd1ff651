"""structlog set-up: JSON lines for journald and files, pretty output on a terminal.

With JSON every line is JSON, whoever writes it:

- our own events go straight from structlog;
- the standard library's loggers (aiohttp, asyncua, watchdog, asyncio, `warnings`) go
  through structlog's `ProcessorFormatter` as `library_log` events with `logger`,
  `message` and, for a traceback, `exception`;
- for the daemon (`capture_stderr`), what native libraries write straight to file
  descriptor 2 (libpng's "iCCP: known incorrect sRGB profile" from inside OpenCV, ONNX
  Runtime, ...) is read from a pipe by a thread and written as one `native_stderr`
  event per line, and an uncaught exception is logged as `unhandled_exception` with its
  traceback before the process ends.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import fcntl
import logging
import os
import sys
import threading
from types import TracebackType
from typing import IO, Any

import structlog

_HANDLER_NAME = "crystal-monitor"
_PIPE_BYTES = 1 << 20  # room for a burst of native output while the reader is busy
_MAX_LINE_BYTES = 16_384  # a longer native line is cut into events of this size


class _CurrentStderr:
    """Writes whole lines to whatever `sys.stderr` is now (a test may swap it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _LineWriter:
    """Writes whole lines to a file descriptor, one `os.write` each under a lock, so lines
    from structlog, the standard library and the native-stderr reader never interleave."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        return len(text)

    def flush(self) -> None:
        """Every write is already on the descriptor."""


class _NativeStderrCapture:
    """File descriptor 2 becomes a pipe; a thread turns each line into a JSON event.

    The reader writes only to the original stderr (a duplicate descriptor), never to
    fd 2, so it cannot feed itself. At exit (and in `restore_stderr`) fd 2 is put back
    and the pipe drained, so the last lines before an exit, a traceback among them, are
    kept. A fatal signal's traceback (faulthandler) goes to the original stderr
    directly: a dying process has no reader thread left.
    """

    def __init__(self, render: structlog.typing.Processor) -> None:
        self._render = render
        self._restored = False
        sys.stderr.flush()
        self.real_fd = os.dup(2)
        self.writer = _LineWriter(self.real_fd)
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd
        self._real_file: IO[str] = os.fdopen(os.dup(self.real_fd), "w", closefd=True)
        faulthandler.enable(file=self._real_file, all_threads=True)
        self._thread = threading.Thread(target=self._pump, name="native-stderr", daemon=True)
        self._thread.start()
        atexit.register(self.restore)

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_fd, 65_536)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._emit(line)
            while len(pending) > _MAX_LINE_BYTES:
                self._emit(pending[:_MAX_LINE_BYTES])
                pending = pending[_MAX_LINE_BYTES:]
        if pending:
            self._emit(pending)
        os.close(self._read_fd)

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "backslashreplace").rstrip("\r")
        if not text.strip():
            return
        event: Any = {"event": "native_stderr", "line": text, "level": "warning"}
        for processor in _STAMP:
            event = processor(None, "warning", event)
        self.writer.write(str(self._render(None, "warning", event)) + "\n")

    def restore(self) -> None:
        """Put the original stderr back on fd 2 and write out what is still in the pipe.

        The pipe ends when no descriptor 2 refers to it; a child process that inherited
        it can hold it open, hence the bounded wait.
        """
        if self._restored:
            return
        self._restored = True
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self.real_fd, 2)
        self._thread.join(timeout=2.0)


_STAMP: list[structlog.typing.Processor] = [structlog.processors.TimeStamper(fmt="iso", utc=True)]
_capture: _NativeStderrCapture | None = None


def configure_logging(
    level: str = "info", fmt: str = "auto", *, capture_stderr: bool = False
) -> None:
    """Set up structlog and the standard library's logging for `level` and `fmt`.

    `capture_stderr` is for the daemon, whose stderr is its log: with JSON, native
    output on fd 2 and uncaught exceptions become JSON events too. Commands run inside
    another program (tests, a shell) leave fd 2 alone.
    """
    global _capture  # noqa: PLW0603 - one capture per process, set up once
    pretty = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if pretty else structlog.processors.JSONRenderer()
    )
    stream: _CurrentStderr | _LineWriter = _CurrentStderr()
    if capture_stderr and not pretty:
        if _capture is None:
            _capture = _NativeStderrCapture(renderer)
        stream = _capture.writer
        _log_uncaught_exceptions()
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *_STAMP,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # Our writers have the write and flush WriteLogger uses, not all of TextIO.
        logger_factory=structlog.WriteLoggerFactory(file=stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    _route_standard_logging(numeric_level, renderer, stream)


def restore_stderr() -> None:
    """Give fd 2 back to the original stderr (for a plain last line before exiting)."""
    if _capture is not None:
        _capture.restore()


def _name_library_event(
    _logger: Any, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A library's free-text message becomes `message`; the event name stays stable."""
    event_dict["message"] = event_dict.pop("event", "")
    event_dict["event"] = "library_log"
    return event_dict


def _route_standard_logging(
    level: int, renderer: structlog.typing.Processor, stream: _CurrentStderr | _LineWriter
) -> None:
    """Every standard-library logger through one handler that renders like structlog.

    Libraries log at their own level; their warnings and errors are shown (their info
    is chatter: asyncua logs every session), everything with log_level = debug.
    """
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                *_STAMP,
                _name_library_event,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    logging.captureWarnings(True)


def _log_uncaught_exceptions() -> None:
    """An exception nobody caught is logged as one JSON event with its traceback."""
    log = structlog.get_logger("monitor")

    def on_main(
        kind: type[BaseException], value: BaseException, traceback: TracebackType | None
    ) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, traceback)
            return
        log.critical("unhandled_exception", exc_info=(kind, value, traceback))

    def on_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        log.error(
            "thread_crashed",
            thread=args.thread.name if args.thread is not None else None,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    sys.excepthook = on_main
    threading.excepthook = on_thread
