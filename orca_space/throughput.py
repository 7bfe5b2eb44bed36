"""Tokens per second over the last minute, for the page's engine panel.

The chat service adds each reply's new tokens as they stream (from either backend); the panel
reads the rate. Both sides can be on different threads, so a lock guards the window.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from time import monotonic

WINDOW_S = 60.0


class ThroughputMeter:
    """Generated tokens in a sliding window; `rate()` is tokens per second over it."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = monotonic) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._started = clock()
        self._counts: deque[tuple[float, int]] = deque()  # (when, tokens), oldest first
        self._total = 0  # of the counts in the window
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            now = self._clock()
            self._counts.append((now, tokens))
            self._total += tokens
            self._forget_before(now - self.window_s)

    def rate(self) -> float:
        """Tokens per second over the window (over the time since start, in the first minute)."""
        with self._lock:
            now = self._clock()
            self._forget_before(now - self.window_s)
            span = min(self.window_s, now - self._started)
            return self._total / span if span > 0 else 0.0

    def _forget_before(self, cutoff: float) -> None:
        while self._counts and self._counts[0][0] <= cutoff:
            self._total -= self._counts.popleft()[1]
