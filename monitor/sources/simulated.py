"""The probe simulator as a live probe: used by the demo's tests and by pipeline tests.

Frames are rendered on the source's own thread at `fps` real frames per second; their
timestamps come from the daemon's clock, so a test with a fast clock compresses a
30-minute batch into a minute. The truth of every frame is kept for checking.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from monitor.config.settings import SimulatedSourceConfig
from monitor.simulator import CropSimulator, FrameConfig, FrameSimulator, parse_profile
from monitor.simulator.labels import PG
from monitor.sources.base import FrameItem, FrameSink


@dataclass(frozen=True)
class SimulatedTruth:
    ts: float
    pg_fraction: float  # the profile's share at this time
    n_pg: int  # particles drawn (in focus, for frames)
    n_total: int


class SimulatedSource:
    def __init__(
        self, probe_id: str, config: SimulatedSourceConfig, *, clock: Callable[[], float]
    ) -> None:
        self.probe_id = probe_id
        self._config = config
        self._clock = clock
        self._profile = parse_profile(config.profile)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.truth: deque[SimulatedTruth] = deque(maxlen=100_000)
        self.dropped = 0
        if config.mode == "frame":
            self._frames = FrameSimulator(
                FrameConfig(
                    width=config.width,
                    height=config.height,
                    particles=config.particles,
                    profile=self._profile,
                ),
                seed=config.seed,
            )
        else:
            self._crops = CropSimulator(config.seed)
            self._rng = np.random.default_rng(config.seed + 1)

    def start(self, sink: FrameSink) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(sink,), name=f"simulated-{self.probe_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def health(self) -> tuple[bool, str]:
        return (self._thread is not None and self._thread.is_alive(), "simulating")

    def _run(self, sink: FrameSink) -> None:
        started = self._clock()
        period = 1.0 / self._config.fps
        next_at = time.monotonic()
        sequence = 0
        while not self._stop.is_set():
            ts = self._clock()
            image = self._render(ts, ts - started)
            item = FrameItem(
                probe=self.probe_id,
                key=f"sim-{started:.3f}-{sequence:08d}",
                ts=ts,
                read=functools.partial(_same, image),
                journal=False,
            )
            if not sink.put(item, block=False):
                self.dropped += 1
            sequence += 1
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _render(self, ts: float, elapsed: float) -> np.ndarray:
        share = self._profile.fraction_at(elapsed)
        if self._config.mode == "crop":
            label = PG if self._rng.random() < share else "CEX"
            self.truth.append(SimulatedTruth(ts, share, int(label == PG), 1))
            return self._crops.render(label)
        image, particles = self._frames.render(elapsed)
        in_focus = [p for p in particles if p.in_focus]
        n_pg = sum(p.label == PG for p in in_focus)
        self.truth.append(SimulatedTruth(ts, share, n_pg, len(in_focus)))
        return image


def _same(image: np.ndarray) -> np.ndarray:
    """The frame is already in memory: reading it is returning it."""
    return image
