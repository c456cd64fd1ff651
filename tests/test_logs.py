"""The daemon's JSON log: every line JSON, and nothing lost on the way out of a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CRASHING = textwrap.dedent(
    """
    import logging, os, sys, threading, traceback
    from monitor.logs import configure_logging
    configure_logging("info", "json", capture_stderr=True)
    os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\\n")
    logging.getLogger("asyncua.server").warning("Got malformed header %s", "H")
    try:
        1 / 0
    except ZeroDivisionError:
        traceback.print_exc()  # Python's own writing on stderr goes through the pipe too
    threading.Thread(target=lambda: 1 / 0, name="worker").start()
    os.write(2, b"a native line without its newline")
    raise RuntimeError("boom at the end")
    """
)


def test_native_lines_library_logs_and_a_crash_traceback_all_arrive_as_json(
    tmp_path: Path,
) -> None:
    """Run in a process of its own, the way the daemon sets itself up: fd 2 becomes a pipe
    read by a thread, so the last lines before the process dies must still be drained."""
    script = tmp_path / "crashing.py"
    script.write_text(CRASHING)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON, or this fails
    native = [e["line"] for e in events if e["event"] == "native_stderr"]
    assert native[0] == "libpng warning: iCCP: known incorrect sRGB profile"
    assert "ZeroDivisionError: division by zero" in native
    assert native[-1] == "a native line without its newline"
    [library] = [e for e in events if e["event"] == "library_log"]
    assert library["logger"] == "asyncua.server" and library["level"] == "warning"
    assert library["message"] == "Got malformed header H"
    [thread] = [e for e in events if e["event"] == "thread_crashed"]
    assert thread["thread"] == "worker" and "ZeroDivisionError" in thread["exception"]
    [crash] = [e for e in events if e["event"] == "unhandled_exception"]
    assert crash["level"] == "critical"
    assert 'raise RuntimeError("boom at the end")' in crash["exception"]
    assert crash["exception"].endswith("RuntimeError: boom at the end")
