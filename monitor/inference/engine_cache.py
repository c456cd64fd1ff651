"""The TensorRT engine cache: one file per model, TensorRT, GPU, precision and batch profile.

An engine takes seconds to minutes to build and is only valid for the exact
combination it was built for, so that combination is its key. Each file begins with
one header line naming its key and the sha256 of the engine bytes that follow: a file
that was truncated, corrupted or copied under the wrong name is recognised before
TensorRT sees it, logged and rebuilt, never fatal. Files are written to a temporary
name in the same folder, fsynced and renamed, so a crash never leaves a half-written
engine under the real name.

Nothing here imports TensorRT: building and deserializing come in as functions, so the
cache logic, the file handling and the logging run (and are tested) without a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import structlog

log = structlog.get_logger(__name__)

MAGIC = b"crystal-monitor tensorrt engine\n"
FILE_FORMAT = 1
SUFFIX = ".engine"
# systemd's start timeout is pushed out by this much, this often, while an engine builds.
BUILD_TIMEOUT_EXTENSION_S = 180.0
BUILD_TIMEOUT_INTERVAL_S = 60.0
# A temporary file this old was left by a crashed build; younger ones may be another
# process's build in progress (`build-engine` while the daemon runs).
STALE_TEMPORARY_S = 24 * 3600.0

Precision = Literal["fp16", "int8"]
TimeoutExtender = Callable[[float], object]
T = TypeVar("T")


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on; any change means another engine."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: Precision
    min_batch: int
    opt_batch: int
    max_batch: int
    calibration: str = ""  # digest of the INT8 calibration images; empty for fp16

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def file_name(self) -> str:
        """Readable at a glance, unique through the digest."""
        return (
            f"{self.onnx_sha256[:12]}-{self.precision}-b{self.min_batch}-{self.max_batch}-"
            f"{self.digest[:16]}{SUFFIX}"
        )

    def describe(self) -> str:
        return (
            f"{self.precision}, batch {self.min_batch}-{self.max_batch}, TensorRT "
            f"{self.tensorrt_version}, {self.gpu_name} (compute {self.compute_capability})"
        )


class EngineFileError(Exception):
    """A cached engine file that cannot be used; the message is the reason."""


def encode_engine_file(key: EngineKey, payload: bytes, *, build_seconds: float) -> bytes:
    header = {
        "format": FILE_FORMAT,
        "key": key.to_json(),
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(build_seconds, 1),
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode_engine_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Split a cache file into its header and engine bytes; raise EngineFileError."""
    if not data.startswith(MAGIC):
        raise EngineFileError("not an engine file of this cache (no header)")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise EngineFileError("header is cut off")
    try:
        header = json.loads(data[len(MAGIC) : end])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineFileError(f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FILE_FORMAT:
        raise EngineFileError(f"unknown file format {header.get('format')!r}")
    payload = data[end + 1 :]
    if len(payload) != header.get("payload_bytes"):
        raise EngineFileError(
            f"truncated or padded: {len(payload)} engine bytes, header says "
            f"{header.get('payload_bytes')}"
        )
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise EngineFileError("checksum mismatch: the engine bytes are corrupt")
    return header, payload


def check_engine_file(data: bytes, key: EngineKey) -> bytes:
    """The engine bytes of a cache file made for `key`; raise EngineFileError otherwise."""
    header, payload = decode_engine_file(data)
    found = header.get("key")
    expected = key.to_json()
    if found != expected:
        found = found if isinstance(found, dict) else {}
        differing = sorted(
            name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name)
        )
        details = ", ".join(f"{n} {found.get(n)!r} != {expected.get(n)!r}" for n in differing)
        raise EngineFileError(f"built for another configuration: {details}")
    return payload


@dataclass(frozen=True)
class EngineStatus:
    """What the cache holds for one key, for `doctor` (read without logging)."""

    path: Path
    state: Literal["missing", "valid", "invalid"]
    detail: str


@dataclass(frozen=True)
class LoadedEngine(Generic[T]):
    engine: T
    path: Path
    origin: Literal["cache", "built"]
    seconds: float  # to load from the cache, or to build


class EngineCache:
    """A folder of engine files, each named and checked by its EngineKey."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path_for(self, key: EngineKey) -> Path:
        return self.directory / key.file_name

    def inspect(self, key: EngineKey) -> EngineStatus:
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return EngineStatus(path, "missing", "no engine built yet")
        except OSError as exc:
            return EngineStatus(path, "invalid", f"unreadable: {exc.strerror or exc}")
        try:
            header, _ = decode_engine_file(data)
            check_engine_file(data, key)
        except EngineFileError as exc:
            return EngineStatus(path, "invalid", str(exc))
        return EngineStatus(
            path,
            "valid",
            f"{key.describe()}; built {header.get('built_at')} in {header.get('build_seconds')} s",
        )

    def read(self, key: EngineKey) -> bytes | None:
        """The cached engine bytes for `key`; None when absent or unusable (logged)."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("engine_cache_invalid", path=str(path), reason=f"unreadable: {exc}")
            return None
        try:
            return check_engine_file(data, key)
        except EngineFileError as exc:
            log.warning("engine_cache_invalid", path=str(path), reason=str(exc), action="rebuild")
            return None

    def write(self, key: EngineKey, payload: bytes, *, build_seconds: float) -> Path:
        """Atomically: a temporary file in the same folder, fsync, rename, fsync the folder."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        data = encode_engine_file(key, payload, build_seconds=build_seconds)
        descriptor, temporary = tempfile.mkstemp(
            dir=self.directory, prefix=f".{path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(data)
                stream.flush()
                # Engines are no secret; the service user must read one built at deploy time.
                os.fchmod(stream.fileno(), 0o644)
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_directory(self.directory)
        return path

    def remove_stale_temporaries(self, *, now: float | None = None) -> int:
        """Delete temporary files that crashed builds left behind; returns how many."""
        now = time.time() if now is None else now
        removed = 0
        for candidate in self.directory.glob(f".*{SUFFIX}.*.tmp"):
            with contextlib.suppress(OSError):
                if now - candidate.stat().st_mtime > STALE_TEMPORARY_S:
                    candidate.unlink()
                    removed += 1
        return removed

    def load_or_build(
        self,
        key: EngineKey,
        *,
        build: Callable[[], bytes],
        deserialize: Callable[[bytes], T],
        extend_timeout: TimeoutExtender | None = None,
        force: bool = False,
    ) -> LoadedEngine[T]:
        """The engine for `key`: from the cache when a valid one deserializes, else built.

        A cached file that is corrupt, was built for another key, or that TensorRT
        refuses is logged and rebuilt. The build is logged before it starts and keeps
        systemd's start timeout extended while it runs. A cache that cannot be written
        is logged; the freshly built engine is used anyway.
        """
        path = self.path_for(key)
        if self.directory.is_dir():
            self.remove_stale_temporaries()
        started = time.monotonic()
        payload = None if force else self.read(key)
        if payload is not None:
            try:
                engine = deserialize(payload)
            except Exception as exc:  # TensorRT refusing a cached engine must not stop the start
                log.warning(
                    "engine_cache_rejected", path=str(path), error=str(exc), action="rebuild"
                )
            else:
                seconds = time.monotonic() - started
                log.info("engine_cache_hit", path=str(path), seconds=round(seconds, 2))
                return LoadedEngine(engine, path, "cache", seconds)
        log.info(
            "engine_build_started",
            path=str(path),
            engine=key.describe(),
            onnx_sha256=key.onnx_sha256[:12],
            note="building a TensorRT engine can take several minutes",
        )
        started = time.monotonic()
        with keep_extending_timeout(extend_timeout):
            payload = build()
        seconds = time.monotonic() - started
        try:
            self.write(key, payload, build_seconds=seconds)
        except OSError as exc:
            log.error(
                "engine_cache_write_failed",
                path=str(path),
                error=str(exc),
                consequence="the engine is rebuilt at the next start",
            )
        log.info("engine_built", path=str(path), seconds=round(seconds, 1), bytes=len(payload))
        return LoadedEngine(deserialize(payload), path, "built", seconds)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX: fsync the folder)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename still happened
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def keep_extending_timeout(
    extend: TimeoutExtender | None,
    *,
    extension_s: float | None = None,
    interval_s: float | None = None,
) -> Iterator[None]:
    """Call `extend(extension_s)` now and every `interval_s` until the block ends.

    systemd's EXTEND_TIMEOUT_USEC moves the start deadline to now + the extension, so a
    build longer than any one extension stays covered as long as the calls keep coming.
    """
    if extend is None:
        yield
        return
    extension_s = BUILD_TIMEOUT_EXTENSION_S if extension_s is None else extension_s
    interval_s = BUILD_TIMEOUT_INTERVAL_S if interval_s is None else interval_s
    if interval_s >= extension_s:
        raise ValueError("interval_s must be shorter than extension_s")
    stop = threading.Event()

    def keep_going() -> None:
        while not stop.wait(interval_s):
            extend(extension_s)

    extend(extension_s)
    thread = threading.Thread(target=keep_going, name="engine-build-timeout", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
