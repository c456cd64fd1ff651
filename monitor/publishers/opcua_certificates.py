"""The OPC UA server's certificate and key files, written so that a crash never leaves
half a file (reading and checking them: `monitor.config.certificates`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


# -- writing ------------------------------------------------------------------------------


def temporary_path(path: Path) -> Path:
    """Where `path` is staged before it is renamed into place (hidden, same folder)."""
    return path.with_name(f".{path.name}{TEMPORARY_SUFFIX}")


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` fully to the temporary name of `path` and fsync it."""
    temporary = temporary_path(path)
    temporary.unlink(missing_ok=True)  # a leftover from a crash may have another mode
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)  # the umask may have narrowed or the owner widened it
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def fsync_directory(folder: Path) -> None:
    """Make renames in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files_atomically(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write each (path, data, mode): all staged and fsynced first, then renamed over the
    old files, then the folders fsynced. A crash leaves every file whole, either old or
    new; between two renames the pair may mix old and new, which the reader detects
    (`key_matches`)."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((_stage(path, data, mode), path))
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, path in staged:
        os.replace(temporary, path)
    for folder in dict.fromkeys(path.parent for _, path in staged):
        fsync_directory(folder)


def remove_leftovers(paths: Sequence[Path]) -> None:
    """Delete temporary files a crash during `write_files_atomically` left behind."""
    for path in paths:
        temporary_path(path).unlink(missing_ok=True)
