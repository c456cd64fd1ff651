"""Throttling of wrong tokens, per peer: a token bucket of allowed failures.

Each peer (an IP address) may fail `burst` token checks at once; after that one more
failure is allowed every `refill_s` seconds, and until then the server answers 429 with
Retry-After without looking at the token, so guessing runs at that rate at most. A
correct token costs nothing and forgets the peer's failures. The table of peers is
bounded: past `max_peers` the peer whose last failure is oldest (the one closest to a
full bucket again) is forgotten first. Pure logic with an injected clock.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

LOGIN_BURST = 5
LOGIN_REFILL_S = 12.0
MAX_PEERS = 4096


@dataclass
class _Bucket:
    tokens: float
    updated: float


class FailureThrottle:
    """Allowed token failures per peer: `burst` at once, then one per `refill_s`."""

    def __init__(
        self,
        *,
        burst: int = LOGIN_BURST,
        refill_s: float = LOGIN_REFILL_S,
        max_peers: int = MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or refill_s <= 0 or max_peers < 1:
            raise ValueError("burst and max_peers must be at least 1, refill_s above 0")
        self.burst = burst
        self.refill_s = refill_s
        self.max_peers = max_peers
        self._clock = clock
        self._peers: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def _refilled(self, peer: str, now: float) -> _Bucket | None:
        bucket = self._peers.get(peer)
        if bucket is None:
            return None
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) / self.refill_s)
        bucket.updated = now
        if bucket.tokens >= self.burst:
            del self._peers[peer]  # a full bucket is the same as no entry
            return None
        return bucket

    def retry_after(self, peer: str) -> int:
        """Whole seconds until `peer` may try a token again; 0 when it may now."""
        bucket = self._refilled(peer, self._clock())
        if bucket is None or bucket.tokens >= 1.0:
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) * self.refill_s))

    def failed(self, peer: str) -> bool:
        """Record a wrong token from `peer`; True when that used up its last try."""
        now = self._clock()
        bucket = self._refilled(peer, now)
        if bucket is None:
            bucket = self._peers[peer] = _Bucket(float(self.burst), now)
        bucket.tokens = max(0.0, bucket.tokens - 1.0)
        self._peers.move_to_end(peer)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        return bucket.tokens < 1.0

    def succeeded(self, peer: str) -> None:
        """A correct token: the peer's failures are forgotten."""
        self._peers.pop(peer, None)
