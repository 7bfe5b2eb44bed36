"""The KV cache: one ring of key/value entries per slot, and how many slots fit.

The cache is shaped [layers, slots, kv_heads, entries, head_dim]; each slot holds one request.
It is a ring: position p lives at entry p % cache_len. Mistral's sliding window means a query
never sees keys more than `window` positions back, so a slot needs `window + chunk` entries
however long the context (a prefill chunk writes all its keys before its first query attends,
and must not overwrite keys that query still sees). For Mistral 7B at an 8k context that is
4608 entries instead of 8192: nearly twice the concurrent chats in the same memory, and decode
steps past position 4608 attend over 4608 keys instead of the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .hf_weights import ModelShape

SMALLEST_KV_BUCKET = 256
# Entries allocated past the ring's end and never read. The decode step attends over the first
# kv_len entries; were kv_len ever the whole allocated length, that slice would be contiguous
# where shorter ones are not, and torch.compile would compile the step a second time for it.
# A row riding along in a decode step writes its keys there (`mistral.step_context`).
UNUSED_TAIL = 1
MOVE_BLOCK = 512  # entries copied at a time between slots: the temporary stays small


@dataclass(frozen=True)
class KVCache:
    k: torch.Tensor  # [layers, slots, KVH, cache_len + UNUSED_TAIL, D]
    v: torch.Tensor  # [layers, slots, KVH, cache_len + UNUSED_TAIL, D]
    cache_len: int  # ring entries per slot: position p is stored at p % cache_len

    @property
    def slots(self) -> int:
        return self.k.shape[1]


def cache_length(context_length: int, window: int | None, chunk_size: int) -> int:
    """Ring entries a slot needs: the whole context, or less when the sliding window allows.

    A chunk of T <= chunk_size tokens starting at s writes entries for positions s .. s+T-1,
    overwriting positions s-R .. s+T-1-R; its first query needs keys back to s-window+1, so
    R = window + chunk_size loses nothing any query can see.
    """
    if window is None or context_length <= window + chunk_size:
        return context_length
    return window + chunk_size


def padded_forward_fits(end: int, width: int, cache_len: int, window: int | None) -> bool:
    """Whether a prefill forward whose rows are padded to `width` tokens, the furthest ending at
    position `end` (exclusive), keeps every key its queries can see.

    Padding writes keys past a row's real end. Within the ring's first lap (end <= cache_len)
    those entries are written again before anything reads them. Past it, a row's writes wrap
    onto entries holding older positions, which is safe only while the padded width leaves the
    window intact (width <= cache_len - window, as `cache_length` provides for a real ring). A
    cache that is no ring (the context fits it whole, or the model has no window and every key
    stays visible) has no such room: its padded rows must end within it.
    """
    return end <= cache_len or (window is not None and width <= cache_len - window)


def allocate_kv_cache(shape: ModelShape, slots: int, cache_len: int, dtype, device) -> KVCache:
    size = (shape.layers, slots, shape.kv_heads, cache_len + UNUSED_TAIL, shape.head_dim)
    # Zeros, not empty: positions past a row's length are masked, but NaN garbage times a zero
    # attention weight would still be NaN.
    return KVCache(
        torch.zeros(size, dtype=dtype, device=device),
        torch.zeros(size, dtype=dtype, device=device),
        cache_len,
    )


def plan_capacity(
    free_bytes: int,
    bytes_per_token: int,
    cache_len: int,
    reserve_bytes: int = 2 * 2**30,
    reserve_fraction: float = 0.05,
    max_slots: int = 64,
) -> int:
    """How many slots of `cache_len` entries fit in the memory left after loading the weights.

    `reserve_*` keeps room for prefill activations, the sampler's [B, V] temporaries and the
    CUDA graphs' pool. Returns 0 when not even one request fits (the caller says so).
    """
    usable = free_bytes - reserve_bytes - int(free_bytes * reserve_fraction)
    per_slot = bytes_per_token * cache_len
    return max(0, min(max_slots, usable // per_slot))


def kv_bucket(needed: int, cache_len: int) -> int:
    """Entries to attend over: the next power of two >= needed (min 256), capped at the cache
    length (which a ring that has wrapped always needs whole).

    Attending over the whole static cache would read every slot's full context each step; a
    few fixed lengths keep the reads near what is used while staying graph-capturable.
    """
    return min(cache_len, max(SMALLEST_KV_BUCKET, 1 << max(0, needed - 1).bit_length()))


def kv_buckets(cache_len: int) -> list[int]:
    """Every value `kv_bucket` can return for this cache."""
    buckets, size = [], SMALLEST_KV_BUCKET
    while size < cache_len:
        buckets.append(size)
        size *= 2
    return buckets + [cache_len]


def cached_positions(latest: torch.Tensor, kv_len: int, cache_len: int) -> torch.Tensor:
    """latest: [B], each row's newest written position -> [B, L]: the position each of the
    first L ring entries holds (negative where nothing has been written yet)."""
    entries = torch.arange(kv_len, device=latest.device)  # [L]
    newest = latest[:, None]  # [B, 1]
    return newest - torch.remainder(newest - entries, cache_len)


def move_entries(cache: KVCache, source: int, target: int, entries: int, swap: bool = False) -> None:
    """Copy the first `entries` ring entries of slot `source` into slot `target`, every layer;
    with `swap`, target's go to source at the same time. A block of entries at a time, so the
    temporary a swap needs stays small however long the ring (the device's memory is the
    cache's)."""
    for start in range(0, entries, MOVE_BLOCK):
        block = slice(start, min(entries, start + MOVE_BLOCK))
        for tensor in (cache.k, cache.v):  # [layers, slots, KVH, entries, D]
            held = tensor[:, target, :, block].clone() if swap else None
            tensor[:, target, :, block] = tensor[:, source, :, block]
            if held is not None:
                tensor[:, source, :, block] = held
