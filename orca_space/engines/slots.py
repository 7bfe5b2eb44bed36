"""What each slot of the batched engine's KV cache holds, and the moves that keep decoding cheap.

A slot (a row of the cache and of the decode buffers) holds a live request, a kept cache
(`prefix_cache.py`: what an ended request left, for the next turn to start from) or nothing.
Row b of a decode step is slot b and a step covers slots [0, B), so the step's cost follows the
highest live row, not the number of live requests. `SlotTable` therefore keeps live requests in
rows [0, live): a new request takes row `live`; a request that ends below others leaves a hole
that `compact` fills with the highest live request. Kept caches are moved out of the way, never
in it: each move copies the entries a cache has used (at most the ring, over every layer), once
per admission or end, never per step. Riding along in a step (a padded batch on CUDA graphs)
does a kept cache no harm: such rows write past the ring's end (`mistral.step_context`).

When a slot is needed for a new request and no row is free, the least recently used kept cache
goes. Everything here runs on the engine thread; `lock` (the engine's) guards the row list that
callers' threads read.
"""

from __future__ import annotations

import logging
import threading

from . import device
from .kv_cache import KVCache, move_entries
from .prefix_cache import PrefixCache, entries_to_copy, is_redundant, used_entries
from .requests import RequestHandle
from .scheduling import Slot

log = logging.getLogger(__name__)


class MoveFailed(Exception):
    """Moving a live request's cache failed; `slot` is that request (its cause: why)."""

    def __init__(self, slot: Slot) -> None:
        super().__init__(f"moving request {slot.handle.id}'s cache failed")
        self.slot = slot


class SlotTable:
    """Live requests in the lowest rows, kept caches above them; see the module docstring."""

    def __init__(
        self, capacity: int, cache_len: int, window: int | None, mode: str, lock: threading.Condition
    ) -> None:
        self.live: list[Slot | None] = [None] * capacity
        self.kept = PrefixCache(cache_len, window, mode)
        self.cache_len = cache_len
        self.lock = lock
        self.cache: KVCache | None = None  # set once warm-up has allocated it
        self.buffers = None  # decode_step.DecodeBuffers, likewise
        self.prompt_tokens_prefilled = 0  # run through the model (the engine counts each chunk)
        self.prompt_tokens_reused = 0  # taken from kept caches instead, over every admitted request

    def active(self) -> list[Slot]:
        return [slot for slot in self.live if slot is not None]

    @property
    def live_count(self) -> int:
        return sum(slot is not None for slot in self.live)

    def stats(self) -> dict[str, object]:
        """The `EngineStats` fields about kept caches."""
        return {
            "prefix_cache": self.kept.mode,
            "kept_caches": len(self.kept),
            "prompt_tokens_prefilled": self.prompt_tokens_prefilled,
            "prompt_tokens_reused": self.prompt_tokens_reused,
        }

    def clear(self) -> None:
        with self.lock:
            self.live[:] = [None] * len(self.live)
        self.kept.clear()

    # -- a request comes --
    def admit(self, handle: RequestHandle) -> Slot:
        """Place a request in row `live_count` (free after `compact`), starting from the longest
        intact prefix of its prompt that a kept cache of its scope holds."""
        row = self.live_count
        assert self.live[row] is None, "compact() leaves the row after the live ones free"
        try:
            reused, high_water = self._take_prefix(handle, row)
        except Exception as exc:  # a copy failed half-way: trust no kept cache, prefill it all
            if device.is_fatal_device_error(exc):
                raise  # the CUDA context is gone for everyone: the engine fails all
            log.warning("moving a kept cache failed; prefilling request %s whole", handle.id, exc_info=exc)
            self.kept.clear()
            reused, high_water = 0, 0
        slot = Slot(handle, row, prefilled=reused, high_water=high_water)
        with self.lock:
            self.live[row] = slot
        self.prompt_tokens_reused += reused
        return slot

    def _take_prefix(self, handle: RequestHandle, row: int) -> tuple[int, int]:
        """Bring the best kept prefix into `row`; (tokens reused, the row's high water)."""
        match = self.kept.best_match(handle.prompt_ids, handle.cache_scope)
        if match is None:
            self._make_room(row)
            return 0, 0
        source, length = match
        kept = self.kept.get(source)
        needed = entries_to_copy(length, kept.high_water, self.cache_len)
        if is_redundant(kept, length):  # the same conversation: its cache comes to this row
            if source != row:
                displaced = self.kept.get(row)  # goes to the row the cache leaves
                extent = max(needed, used_entries(displaced.high_water, self.cache_len) if displaced else 0)
                move_entries(self.cache, source, row, extent, swap=displaced is not None)
                self.kept.swap(source, row)
            self.kept.forget(row)
            return length, kept.high_water
        # A start shared with another conversation: copy it, keep that conversation's cache.
        self.kept.touch(source)  # used now: eviction goes by use, not by when it was kept
        if source == row:  # the row keeps its entries (a copy goes elsewhere, or none): start on them
            self._make_room(row)
            return length, kept.high_water
        self._make_room(row, exclude=source)
        move_entries(self.cache, source, row, needed)
        return length, kept.high_water

    def _make_room(self, row: int, exclude: int | None = None) -> None:
        """`row` takes a new request: the kept cache it holds (if any) is copied to a free row,
        or over the least recently used kept cache when that one is older, or is dropped."""
        kept = self.kept.get(row)
        if kept is None:
            return
        target = self._free_row(exclude={row, exclude})
        if target is None:
            victim = self.kept.eviction_victim(exclude={row, exclude})
            if victim is None or self.kept.get(victim).last_used > kept.last_used:
                self.kept.forget(row)  # it is the least recently used itself
                return
            self.kept.forget(victim)
            target = victim
        move_entries(self.cache, row, target, used_entries(kept.high_water, self.cache_len))
        self.kept.swap(row, target)

    def _free_row(self, exclude: set[int | None]) -> int | None:
        """The highest row holding nothing (kept caches gather at the top, away from the rows
        new requests take)."""
        for row in reversed(range(len(self.live))):
            if self.live[row] is None and row not in self.kept and row not in exclude:
                return row
        return None

    # -- a request ends --
    def release(self, slot: Slot, keep: bool) -> None:
        """The request in `slot` ended; with `keep`, what it computed stays for a later prompt."""
        with self.lock:
            self.live[slot.index] = None
        if keep:
            self.kept.keep(slot.index, slot.cached_tokens(), slot.high_water, slot.handle.cache_scope)
        else:
            self.kept.forget(slot.index)

    def holes(self) -> bool:
        count = self.live_count
        return any(slot is None for slot in self.live[:count])

    def compact_once(self) -> None:
        """Move the highest live request into the lowest row below `live_count` that holds
        none; whatever that row held (a kept cache) goes to the row it leaves. Raises MoveFailed
        naming that request if the copy fails (the engine then fails it)."""
        count = self.live_count
        hole = next(row for row in range(count) if self.live[row] is None)
        slot = self.live[max(row for row, s in enumerate(self.live) if s is not None)]
        displaced = self.kept.get(hole)
        extent = used_entries(slot.high_water, self.cache_len)
        if displaced is not None:
            extent = max(extent, used_entries(displaced.high_water, self.cache_len))
        source = slot.index
        try:
            move_entries(self.cache, source, hole, extent, swap=displaced is not None)
            self.buffers.move_row(source, hole)
        except Exception as exc:  # the hole's entries may have gone to `source` already: keep neither
            self.kept.forget(hole)
            raise MoveFailed(slot) from exc
        self.kept.swap(source, hole)
        with self.lock:
            self.live[source], self.live[hole] = None, slot
            slot.index = hole
