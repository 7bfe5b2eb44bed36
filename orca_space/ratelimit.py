"""Per-client rate limiting, keyed so that a client cannot reset its own limit.

The key is the client's address: the TCP peer, or, behind proxies we trust, the address the
nearest trusted proxy saw. Not the login: `--auth` is one account that everyone with the
password shares, so keyed by it, one of them could spend the limit for all (issue #27). Not the
page's session either: a client makes up a new one with every request.
`X-Forwarded-For` is a list that every hop appends to, so a client can put anything at its
front; only the entries our own proxies appended (counted from the right) are believed.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

MAX_TRACKED_CLIENTS = 100_000


def client_key(peer_host: str | None, forwarded_for: str | None, trusted_proxy_hops: int) -> str:
    if trusted_proxy_hops > 0 and forwarded_for:
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        if len(hops) >= trusted_proxy_hops:
            # Our nearest proxy appended the last entry, the one before it the entry before…
            return f"ip:{hops[-trusted_proxy_hops]}"
    return f"ip:{peer_host or 'unknown'}"


class RateLimiter:
    """At most `limit` requests per `window` seconds for each key (a sliding window)."""

    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        if limit < 1 or window <= 0:
            raise ValueError("limit must be at least 1 and window positive")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._hits: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Count a request; 0.0 if allowed, else the seconds until one is allowed (not counted)."""
        now = self._clock()
        with self._lock:
            hits = self._hits.setdefault(key, collections.deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return hits[0] + self.window - now
            hits.append(now)
            if len(self._hits) > MAX_TRACKED_CLIENTS:
                self._forget_idle(now)
            return 0.0

    def give_back(self, key: str) -> None:
        """Uncount the latest request of `key` (it was counted, then came to nothing)."""
        with self._lock:
            if hits := self._hits.get(key):
                hits.pop()

    def _forget_idle(self, now: float) -> None:
        idle = [k for k, hits in self._hits.items() if not hits or hits[-1] <= now - self.window]
        for key in idle:
            del self._hits[key]
