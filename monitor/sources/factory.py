"""The source a probe's configuration asks for; heavy imports only for the type used."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monitor.config.settings import (
    FolderSourceConfig,
    ProbeConfig,
    SimulatedSourceConfig,
    StreamSourceConfig,
)
from monitor.imaging.decode import DecodeLimits
from monitor.sources.base import Source
from monitor.store import Store


def create_source(
    probe: ProbeConfig,
    *,
    store: Store,
    clock: Callable[[], float],
    retention_s: Callable[[], float],
) -> Source:
    """`store` keeps the folder source's journal (files already counted, or skipped);
    `retention_s` is read at each scan (a reload may change it)."""
    config = probe.source
    limits = DecodeLimits(max_pixels=probe.max_pixels, max_decoded_bytes=probe.max_decoded_bytes)
    if isinstance(config, FolderSourceConfig):
        from monitor.sources.folder import FolderSource  # noqa: PLC0415

        def record_skipped(keys: list[str], reason: str) -> None:
            store.record_skipped(probe.id, keys, reason, clock())

        def journaled(keys: Sequence[str]) -> set[str]:
            return store.journaled(probe.id, keys)

        return FolderSource(
            probe.id,
            config,
            journaled=journaled,
            record_skipped=record_skipped,
            limits=limits,
            retention_s=retention_s,
            clock=clock,
        )
    if isinstance(config, SimulatedSourceConfig):
        from monitor.sources.simulated import SimulatedSource  # noqa: PLC0415

        return SimulatedSource(probe.id, config, clock=clock)
    if isinstance(config, StreamSourceConfig):
        from monitor.sources.stream import StreamSource  # noqa: PLC0415

        return StreamSource(probe.id, config, clock=clock)
    raise AssertionError(f"unhandled source type {config!r}")
