"""Kept caches on the host: which prefix a prompt may take, from whom, and which cache goes first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from orca_space.engines import kv_cache
from orca_space.engines.prefix_cache import (
    PrefixCache,
    common_prefix,
    entries_to_copy,
    is_redundant,
    prefix_intact,
)


def test_common_prefix_counts_leading_equal_tokens():
    a = np.array([1, 2, 3, 4])
    assert common_prefix(a, np.array([1, 2, 9])) == 2
    assert common_prefix(a, np.array([1, 2])) == 2, "one is a prefix of the other"
    assert common_prefix(a, np.array([5])) == 0


@given(
    cache_len=st.integers(4, 40),
    window=st.one_of(st.none(), st.integers(1, 40)),
    high_water=st.integers(1, 120),
    length=st.integers(1, 120),
)
def test_an_intact_prefix_really_is_in_the_ring(cache_len, window, high_water, length):
    """Write positions 0 .. high_water-1 into a ring in order; whenever `prefix_intact` says so,
    every position a query at `length` can see below `length` is still where it was written."""
    length = min(length, high_water)
    ring = [-1] * cache_len
    for position in range(high_water):
        ring[position % cache_len] = position
    oldest = 0 if window is None else max(0, length - window + 1)
    holds = all(ring[q % cache_len] == q for q in range(oldest, length))
    if prefix_intact(length, high_water, cache_len, window):
        assert holds
    if high_water <= cache_len:
        assert prefix_intact(length, high_water, cache_len, window), "nothing wrapped: always intact"


def test_the_intact_limit_at_a_wrapped_ring():
    # Ring of 32, window 16, written up to 40: positions 0-7 were overwritten by 32-39.
    assert prefix_intact(length=23, high_water=40, cache_len=32, window=16)  # sees 8..22
    assert not prefix_intact(length=22, high_water=40, cache_len=32, window=16)  # would see 7
    assert not prefix_intact(length=39, high_water=40, cache_len=32, window=None), "no window sees 0"
    assert entries_to_copy(10, high_water=20, cache_len=32) == 10
    assert entries_to_copy(30, high_water=40, cache_len=32) == 32, "after a wrap, the whole ring"


def kept_cache(mode="private") -> PrefixCache:
    return PrefixCache(cache_len=1000, window=None, mode=mode)


def test_the_longest_intact_prefix_of_the_same_scope_wins():
    cache = kept_cache()
    cache.keep(0, [1, 2, 3, 4, 5], 5, "alice")
    cache.keep(1, [1, 2, 3, 9], 4, "alice")
    cache.keep(2, [1, 2, 3, 4, 5, 6], 6, "bob")
    assert cache.best_match([1, 2, 3, 4, 5, 6, 7], "alice") == (0, 5)
    assert cache.best_match([1, 2, 3, 4, 5, 6, 7], "bob") == (2, 6)
    assert cache.best_match([1, 2, 3, 4, 5, 6, 7], "carol") is None, "nobody else's cache"
    assert cache.best_match([1, 2, 3, 4, 5], "alice") == (0, 4), "the last prompt token is computed"
    assert cache.best_match([7, 7], "alice") is None
    assert cache.best_match([1, 2, 3], None) is None, "no scope, no reuse"


def test_equal_prefixes_go_to_the_most_recent_and_eviction_to_the_oldest():
    cache = kept_cache()
    cache.keep(3, [1, 2, 3], 3, "alice")
    cache.keep(5, [1, 2, 4], 3, "alice")
    assert cache.best_match([1, 2, 7], "alice") == (5, 2)
    assert cache.eviction_victim() == 3
    assert cache.eviction_victim(exclude={3}) == 5
    cache.swap(3, 4)
    assert 3 not in cache and cache.eviction_victim() == 4, "the record follows its entries"


def test_scopes_modes_and_what_is_not_kept():
    shared = kept_cache("shared")
    shared.keep(0, [1, 2, 3], 3, "alice")
    assert shared.best_match([1, 2, 3, 4], "bob") == (0, 3), "shared: any visitor's"
    off = kept_cache("off")
    off.keep(0, [1, 2, 3], 3, "alice")
    assert len(off) == 0 and off.best_match([1, 2, 3, 4], "alice") is None
    private = kept_cache()
    private.keep(0, [1, 2, 3], 3, None)
    private.keep(1, [], 0, "alice")
    assert len(private) == 0, "no scope or no token: nothing to keep"
    with pytest.raises(ValueError, match="prefix_cache"):
        PrefixCache(10, None, "sometimes")


def test_a_wrapped_cache_gives_nothing_it_no_longer_holds():
    cache = PrefixCache(cache_len=32, window=16)
    cache.keep(0, list(range(100, 139)), high_water=40, scope="alice")
    assert cache.best_match(list(range(100, 139)) + [7], "alice") == (0, 39), "the next turn"
    assert cache.best_match(list(range(100, 110)) + [7], "alice") is None, "an edit far back"


def test_a_cache_mostly_reused_is_redundant():
    cache = kept_cache()
    cache.keep(0, list(range(10)), 10, "alice")
    kept = cache.get(0)
    assert is_redundant(kept, 9) and is_redundant(kept, 5)
    assert not is_redundant(kept, 4), "a short shared start leaves the rest worth keeping"


@pytest.mark.parametrize("swap", [False, True])
def test_moving_entries_between_slots(swap, monkeypatch):
    monkeypatch.setattr(kv_cache, "MOVE_BLOCK", 3)  # several blocks
    k = torch.arange(2 * 3 * 1 * 8 * 2, dtype=torch.float32).view(2, 3, 1, 8, 2)
    cache = kv_cache.KVCache(k.clone(), -k.clone(), cache_len=7)
    kv_cache.move_entries(cache, source=2, target=0, entries=5, swap=swap)
    assert torch.equal(cache.k[:, 0, :, :5], k[:, 2, :, :5]) and torch.equal(
        cache.v[:, 0, :, :5], -k[:, 2, :, :5]
    )
    assert torch.equal(cache.k[:, 0, :, 5:], k[:, 0, :, 5:]), "only the entries asked for"
    assert torch.equal(cache.k[:, 1], k[:, 1])
    expected = k[:, 0, :, :5] if swap else k[:, 2, :, :5]
    assert torch.equal(cache.k[:, 2, :, :5], expected)


def test_a_cache_a_shared_start_was_copied_from_counts_as_used():
    """Alice's first conversation gives her second its start (a copy): it was used then, so
    under pressure bob's cache, untouched since it was kept, goes before it (least recently
    used, not least recently kept)."""
    import threading

    from orca_space.engines.requests import RequestHandle
    from orca_space.engines.slots import SlotTable
    from orca_space.params import SamplingParams

    table = SlotTable(capacity=3, cache_len=128, window=None, mode="private", lock=threading.Condition())
    k = torch.zeros(1, 3, 1, 129, 2)
    table.cache = kv_cache.KVCache(k, k.clone(), cache_len=128)
    start = list(range(1, 41))
    first, second = start + [7] * 60, start + [8] * 60

    def serve(prompt, scope):
        slot = table.admit(RequestHandle(prompt, SamplingParams(max_new_tokens=1), cache_scope=scope))
        reused = slot.prefilled
        slot.prefilled = slot.high_water = len(prompt)  # as if prefilled, then stopped
        table.release(slot, keep=True)
        return reused

    serve(first, "alice")
    serve([50] * 30, "bob")
    assert serve(second, "alice") == 40, "alice's second conversation copied the start"
    serve([60] * 30, "carol")  # the three slots are full: one kept cache must go
    kept = {int(table.kept.get(row).tokens[-1]) for row in range(3) if row in table.kept}
    assert kept == {7, 8, 60}, "bob's cache (50s), the least recently used, went; alice's first (7s) stayed"
