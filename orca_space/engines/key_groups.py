"""Which rows of a decode step attend over how many keys: one launch, or two by key bucket.

A decode step attends every row over the same `kv_len`, the bucket of its furthest position, so
one long chat among short ones makes every row read the long one's keys (64 rows near 800 and
one at 4,600 read the ring to 8,192 entries each). Split in two, the short rows run at their own
bucket and only the long ones at the long bucket, each a (batch, kv_len) shape the engine
already captured. The split costs a second launch, which reads the weights again, and the rows
of each launch are slots [0, batch) (the other group's rows ride along at position -1), so it is
worth it only where the estimated bytes read fall by a quarter or more: a rule, not a measured
variant, since the estimate is plain arithmetic on the weights' and the cache's sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from . import kv_cache

# A split must cut the estimated bytes read by at least this fraction (launch and host overhead,
# and the estimate's crudeness, eat the rest).
MIN_SAVING = 0.25


@dataclass(frozen=True)
class KeyGroup:
    """One launch of the decode step: slots [0, batch) over `kv_len` keys, for `rows` only."""

    batch: int
    kv_len: int
    rows: tuple[int, ...]  # slot indices decoding in this launch; the others ride along


@dataclass(frozen=True)
class StepCost:
    """What one launch reads: the weights once, and each row's first kv_len ring entries."""

    weight_bytes: int
    entry_bytes: int  # one ring entry of one slot, every layer, keys and values

    def of(self, batch: int, kv_len: int) -> int:
        return self.weight_bytes + batch * kv_len * self.entry_bytes


def key_groups(
    positions: dict[int, int], cache_len: int, batch_of: Callable[[int], int], cost: StepCost
) -> list[KeyGroup]:
    """positions: slot index -> the position its token goes to this step. `batch_of(n)`: the
    batch a launch over slots [0, n) runs at (rounded up to a captured size, or n)."""
    needs = {row: kv_cache.kv_bucket(position + 1, cache_len) for row, position in positions.items()}
    longest = max(needs.values())
    whole = KeyGroup(batch_of(max(needs) + 1), longest, tuple(sorted(needs)))
    short = sorted(row for row, need in needs.items() if 2 * need <= longest)
    if not short:
        return [whole]
    long = sorted(row for row in needs if row not in short)
    groups = [
        KeyGroup(batch_of(short[-1] + 1), max(needs[row] for row in short), tuple(short)),
        KeyGroup(batch_of(long[-1] + 1), longest, tuple(long)),
    ]
    split_cost = sum(cost.of(group.batch, group.kv_len) for group in groups)
    if split_cost > (1 - MIN_SAVING) * cost.of(whole.batch, whole.kv_len):
        return [whole]
    return groups


def step_cost(weights, cache: kv_cache.KVCache) -> StepCost:
    """The decode step's reads for this model and cache (the embedding reads a row a token)."""
    tensors = [weights.lm_head, weights.norm]
    tensors += [getattr(layer, f.name) for layer in weights.layers for f in fields(layer)]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    layers, _, heads, _, dim = cache.k.shape
    return StepCost(weight_bytes, 2 * layers * heads * dim * cache.k.element_size())
