"""Choosing the next token from logits, per row, with each row's own sampling parameters.

Everything is tensor arithmetic over a batch, with no Python branch on data and no host sync,
so the same function serves an eager CPU step and a decode step replayed as a CUDA graph. The
order matches transformers' `generate`: repetition penalty, temperature, top-k, top-p, a draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import SamplingParams
from .token_masks import mask_disallowed


@dataclass
class SamplingTensors:
    """Per-row parameters, shaped [B, 1] so they broadcast over the vocabulary."""

    temperature: torch.Tensor  # float [B, 1]; 0 marks a greedy row
    top_p: torch.Tensor  # float [B, 1]
    top_k: torch.Tensor  # long [B, 1]; 0 means no top-k
    repetition_penalty: torch.Tensor  # float [B, 1]

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device) -> SamplingTensors:
        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)

        return cls(
            temperature=column([p.temperature for p in params], torch.float32),
            top_p=column([p.top_p for p in params], torch.float32),
            top_k=column([p.top_k for p in params], torch.long),
            repetition_penalty=column([p.repetition_penalty for p in params], torch.float32),
        )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the prompt or reply.

    logits: [B, V] float; seen: [B, V] bool; penalty: [B, 1].
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


# The token a row gets when its logits were not all finite numbers (fp16 overflow in the model):
# the engine fails that request by name instead of streaming what `argmax` makes of NaN.
NON_FINITE = -1


def sample_next_tokens(
    logits: torch.Tensor,
    params: SamplingTensors,
    seen: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    all_greedy: bool = False,
    top_k_bound: int | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token per row, or `NON_FINITE` for a row whose logits are not all finite. Long [B].

    logits: [B, V]; seen: [B, V] bool; seeds, counters: long [B]. Every row takes the sampling
    path and greedy rows are picked with `torch.where`: a graph cannot branch on data. The draw
    inverts the nucleus's CDF at a uniform hashed from (seed, counter), so a row's sample depends
    on its own seed and counter only, never on which rows share the batch, and no generator
    state has to live inside a graph.

    Host-known shortcuts for eager use: `all_greedy` skips the sampling; `top_k_bound` (when
    every row has 0 < top_k <= top_k_bound) ranks only that many candidates instead of sorting V
    (the same draw, except that exactly tied logits may be ranked in another order).
    `allowed` (int32 [B, ceil(V/32)], one bit per token) masks each row's tokens to its grammar
    (`token_masks.py`), after the finiteness check: a masked logit is -inf on purpose.
    """
    finite = torch.isfinite(logits).all(dim=-1)  # [B]
    if allowed is not None:
        logits = mask_disallowed(logits, allowed)
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    chosen = logits.argmax(dim=-1)
    if not all_greedy:
        drawn = draw_from_nucleus(logits, params, seeds, counters, top_k_bound)
        chosen = torch.where(params.temperature.squeeze(1) == 0, chosen, drawn)
    return torch.where(finite, chosen, NON_FINITE)


def draw_from_nucleus(
    logits: torch.Tensor,
    params: SamplingTensors,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    top_k_bound: int | None,
) -> torch.Tensor:
    """Temperature, top-k and top-p, then one draw per row (see `sample_next_tokens`). Long [B]."""
    scaled = logits / torch.where(params.temperature > 0, params.temperature, 1.0)
    # Never let a row's numbers (a huge logit over a tiny temperature) index out of range: on
    # CUDA that is a device-side assert, which poisons the whole process, not one request.
    scaled = scaled.nan_to_num(nan=0.0, posinf=torch.finfo(scaled.dtype).max, neginf=float("-inf"))
    if top_k_bound is not None:
        ranked, order = torch.topk(scaled, min(top_k_bound, scaled.shape[-1]), dim=-1)  # [B, K], sorted
    else:
        # Stable: tied logits rank by token id, whatever the batch size or sort algorithm.
        ranked, order = torch.sort(scaled, dim=-1, descending=True, stable=True)  # [B, V]
    rank = torch.arange(ranked.shape[-1], device=logits.device).unsqueeze(0)  # [1, K]
    in_top_k = rank < torch.where(params.top_k > 0, params.top_k, scaled.shape[-1])  # [B, K]
    probs = torch.softmax(ranked.masked_fill(~in_top_k, float("-inf")), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    # Kept tokens form a prefix of the ranking (top-k and top-p both cut at a rank), so the
    # nucleus's CDF is `cdf` up to its last kept rank.
    kept = (in_top_k & (cdf - probs < params.top_p)).sum(dim=-1, keepdim=True).clamp(min=1)  # [B, 1]
    total = cdf.gather(-1, kept - 1)  # [B, 1]
    target = uniform_from_counter(seeds, counters).unsqueeze(1) * total
    # Rounding can put `target` at the CDF's end: clamp to the last kept rank.
    pick = torch.minimum(torch.searchsorted(cdf, target, right=True), kept - 1)
    return order.gather(-1, pick).squeeze(1)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanche hash of int64 values in [0, 2**32). The multipliers are below 2**31, so no
    product overflows int64 (overflow behaviour would differ between backends)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _MASK32
    return x ^ (x >> 16)


def uniform_from_counter(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """A uniform in [0, 1) per row, float32 [B], a pure function of (seeds[b], counters[b]).

    24 bits, so every value is exact in float32 and below 1.
    """
    bits = _mix32((_mix32(_mix32(seeds & _MASK32) ^ (counters & _MASK32)) + 0x165667B1) & _MASK32)
    return (bits >> 8).float() / float(1 << 24)
