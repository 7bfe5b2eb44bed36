"""What a step hands back for each request besides its token: its logits, for the requests that
record them, and its log-probabilities, for those that ask. Both are read to the host in one copy
per step, and only when some request in it wants them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .requests import TokenLogprobs
from .sampling import LogprobRows
from .scheduling import Slot


def recorded_logits(slots: list[Slot], logits_of: Callable) -> dict[int, torch.Tensor]:
    """slot index -> this step's logits on the CPU, for the requests that record them
    (`logits_of(i, slot)`: the row of `slots[i]`)."""
    return {
        slot.index: logits_of(i, slot).to("cpu", torch.float32, copy=True)
        for i, slot in enumerate(slots)
        if slot.handle.record_logits
    }


def wants_logprobs(slots: list[Slot]) -> bool:
    return any(slot.handle.params.logprobs is not None for slot in slots)


def token_logprobs(slots: list[Slot], rows: LogprobRows | None, indices) -> dict[int, TokenLogprobs]:
    """slot index -> its token's log-probabilities, for the requests that ask: read from `rows`
    (row `indices[i]` is `slots[i]`'s) in one copy to the host, and only when someone asks."""
    if rows is None or not wants_logprobs(slots):
        return {}
    index = list(indices)
    chosen, values, ids = (t[index].tolist() for t in (rows.chosen, rows.top_values, rows.top_ids))
    asked = {}
    for i, slot in enumerate(slots):
        if (count := slot.handle.params.logprobs) is not None:
            asked[slot.index] = TokenLogprobs(chosen[i], tuple(zip(ids[i][:count], values[i][:count])))
    return asked
