"""Kept caches: what a finished request leaves in its slot, and which new prompt may start from it.

A request that ends (finished, cut at its token limit, or stopped) leaves its keys and values in
its slot. The next turn of that conversation, a retry, an edit of its last message or a continue
sends a prompt that starts with the same tokens, so a new request may take the longest common
prefix from the kept cache and prefill only the rest. This module is the host-side bookkeeping
(no tensors, no device): which rows hold a kept cache, for whom, how recently used, and how much
of a prompt each one can give. The engine (`batched.py`) moves the entries on the device.

When a kept prefix is still intact. A slot's cache is a ring: position q lives at entry
q % cache_len. The kept sequence wrote positions [0, high_water), where `high_water` counts every
write, padding past a prefill chunk's end included. Its `tokens` (the prompt and every generated
token but the last, whose keys were never written) all had their keys written. A new request that
starts at position m reads, for its first query, positions down to m - window + 1 (every later
query needs fewer of them); each such entry still holds that position unless the old sequence
wrote a later position onto the same entry: one at least cache_len further on. So the prefix is
intact when max(0, m - window + 1) >= high_water - cache_len (always, while nothing wrapped:
high_water <= cache_len). Entries for positions >= m are written by the new request before any of
its queries reads them. The condition only gets easier as m grows, so a prefix that fails it
cannot be saved by taking fewer tokens: such a request prefills its whole prompt.

Who may reuse what. Each kept cache belongs to a scope (the visitor who sent it, as the web layer
names them): reusing it answers faster, and so would tell another visitor which prefix someone
sent (the timing side channel that vLLM's `cache_salt` closes). A request reuses only its own
scope's caches; a request without a scope neither reuses nor leaves one. `shared` mode puts every
scoped request in one scope (a private Space, where everyone may see the timing).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .options import PREFIX_CACHE_MODES as MODES

SHARED_SCOPE = "*"


@dataclass
class KeptCache:
    """The keys and values a finished request left in one slot."""

    tokens: np.ndarray  # int64 [n]: the tokens at positions [0, n) whose keys the slot holds
    high_water: int  # 1 + the highest position ever written into this slot's ring (>= n)
    scope: str  # who may reuse it
    last_used: int  # a tick: higher is more recent


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The number of leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def prefix_intact(length: int, high_water: int, cache_len: int, window: int | None) -> bool:
    """Whether positions [0, length) are still in a ring written up to `high_water` as far as a
    request starting at `length` can see them (see the module docstring)."""
    oldest_seen = 0 if window is None else max(0, length - window + 1)
    return oldest_seen >= high_water - cache_len


def entries_to_copy(length: int, high_water: int, cache_len: int) -> int:
    """Ring entries that hold positions [0, length) of a cache written up to `high_water`: the
    first `length` until the ring wrapped, all of them after."""
    return min(length, cache_len) if high_water <= cache_len else cache_len


def used_entries(high_water: int, cache_len: int) -> int:
    """Ring entries a sequence written up to `high_water` has touched: what a move must carry."""
    return min(high_water, cache_len)


class PrefixCache:
    """Which slots hold a kept cache, and which of them a new prompt should start from."""

    def __init__(self, cache_len: int, window: int | None, mode: str = "private") -> None:
        if mode not in MODES:
            raise ValueError(f"prefix_cache must be one of {', '.join(MODES)}, got {mode!r}")
        self.cache_len = cache_len
        self.window = window
        self.mode = mode
        self._kept: dict[int, KeptCache] = {}
        self._ticks = itertools.count(1)

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, row: int) -> bool:
        return row in self._kept

    def get(self, row: int) -> KeptCache | None:
        return self._kept.get(row)

    def scope_of(self, scope: str | None) -> str | None:
        """The scope a request's cache is kept and looked up under (None: neither)."""
        if scope is None or self.mode == "off":
            return None
        return SHARED_SCOPE if self.mode == "shared" else scope

    def keep(self, row: int, tokens: Sequence[int], high_water: int, scope: str | None) -> None:
        """Row `row` now holds `tokens` (its request has ended); nothing is kept without a scope
        or without a token."""
        self._kept.pop(row, None)
        scope = self.scope_of(scope)
        if scope is None or not tokens:
            return
        assert high_water >= len(tokens), "every kept token's keys were written"
        kept = KeptCache(np.asarray(tokens, dtype=np.int64), high_water, scope, next(self._ticks))
        self._kept[row] = kept

    def touch(self, row: int) -> None:
        """The cache in `row` was just used (a new request copied its start)."""
        self._kept[row].last_used = next(self._ticks)

    def forget(self, row: int) -> KeptCache | None:
        return self._kept.pop(row, None)

    def clear(self) -> None:
        self._kept.clear()

    def swap(self, a: int, b: int) -> None:
        """Rows a and b exchanged their contents: their records follow."""
        first, second = self._kept.pop(a, None), self._kept.pop(b, None)
        if first is not None:
            self._kept[b] = first
        if second is not None:
            self._kept[a] = second

    def best_match(self, prompt: Sequence[int], scope: str | None) -> tuple[int, int] | None:
        """(row, tokens) of the kept cache that gives `prompt` the longest intact prefix, or None.

        At most len(prompt) - 1 tokens: the last prompt token must go through the model, for the
        logits of the first new token. Among equal prefixes the most recently kept wins.
        """
        scope = self.scope_of(scope)
        if scope is None or len(prompt) < 2 or not self._kept:
            return None
        wanted = np.asarray(prompt, dtype=np.int64)
        best: tuple[int, int, int] | None = None  # (length, last_used, row)
        for row, kept in self._kept.items():
            if kept.scope != scope:
                continue
            length = min(common_prefix(kept.tokens, wanted), len(prompt) - 1)
            if length == 0 or not prefix_intact(length, kept.high_water, self.cache_len, self.window):
                continue
            if best is None or (length, kept.last_used) > best[:2]:
                best = (length, kept.last_used, row)
        return None if best is None else (best[2], best[0])

    def eviction_victim(self, exclude: Iterable[int] = ()) -> int | None:
        """The row of the least recently used kept cache, not counting `exclude`."""
        excluded = set(exclude)
        candidates = [(kept.last_used, row) for row, kept in self._kept.items() if row not in excluded]
        return min(candidates)[1] if candidates else None


def is_redundant(kept: KeptCache, reused: int) -> bool:
    """Whether a kept cache is worth little once `reused` of its tokens went to a new request:
    that request's own cache will hold them. Most of it reused (the next turn, a retry, a
    continue) means the same conversation; a short shared start (a system message another of
    the visitor's conversations also has) leaves the rest worth keeping."""
    return 2 * reused >= len(kept.tokens)
