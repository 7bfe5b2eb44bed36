"""Choosing the next token from logits, per row, with each row's own sampling parameters.

Everything is tensor arithmetic over a batch, with no Python branch on data and no host sync,
so the same function serves an eager CPU step and a decode step replayed as a CUDA graph. The
order matches transformers' `generate`: repetition penalty, temperature, top-k, top-p, a draw.
The API's extra settings fit in as vLLM places them: presence and frequency penalties after the
repetition penalty, min-p with top-k (both cut the ranking before top-p); at their defaults
(0) they change nothing, so greedy replies stay equal to `generate`'s.
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
    # The API's settings (see `params.API_LIMITS`); None where a caller has no such rows.
    min_p: torch.Tensor | None = None  # float [B, 1]; 0 means no min-p
    presence_penalty: torch.Tensor | None = None  # float [B, 1]
    frequency_penalty: torch.Tensor | None = None  # float [B, 1]

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device) -> SamplingTensors:
        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)

        return cls(
            temperature=column([p.temperature for p in params], torch.float32),
            top_p=column([p.top_p for p in params], torch.float32),
            top_k=column([p.top_k for p in params], torch.long),
            repetition_penalty=column([p.repetition_penalty for p in params], torch.float32),
            min_p=column([p.min_p for p in params], torch.float32),
            presence_penalty=column([p.presence_penalty for p in params], torch.float32),
            frequency_penalty=column([p.frequency_penalty for p in params], torch.float32),
        )


@dataclass
class LogprobRows:
    """Where a sampler run writes each row's log-probabilities (`sample_next_tokens`)."""

    chosen: torch.Tensor  # float [B]: the sampled token's
    top_values: torch.Tensor  # float [B, K]: the K likeliest tokens', likeliest first
    top_ids: torch.Tensor  # long [B, K]

    @classmethod
    def allocate(cls, rows: int, k: int, device) -> LogprobRows:
        return cls(
            torch.zeros(rows, device=device),
            torch.zeros(rows, k, device=device),
            torch.zeros(rows, k, dtype=torch.long, device=device),
        )

    def head(self, batch: int) -> LogprobRows:
        return LogprobRows(self.chosen[:batch], self.top_values[:batch], self.top_ids[:batch])


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the prompt or reply.

    logits: [B, V] float; seen: [B, V] bool; penalty: [B, 1].
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_reply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, params: SamplingTensors
) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on tokens already in the reply (not the prompt):
    `presence * (count > 0) + frequency * count` comes off each logit.

    logits: [B, V] float; counts: [B, V] float, each token's count in the reply so far.
    """
    if params.presence_penalty is None or params.frequency_penalty is None:
        return logits
    return logits - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts


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
    counts: torch.Tensor | None = None,
    logprobs_out: LogprobRows | None = None,
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
    `counts` ([B, V] float, each token's count in the reply) enables the reply penalties.

    `logprobs_out` receives each row's log-probabilities from the distribution it is drawn
    from: after penalties, temperature, top-k, min-p and top-p (tokens cut are -inf); a greedy
    row's are the penalised logits' log-softmax (temperature 1, nothing cut), as vLLM's
    processed log-probabilities are. It needs the full ranking: no `all_greedy`, no `top_k_bound`.
    `allowed` (int32 [B, ceil(V/32)], one bit per token) masks each row's tokens to its grammar
    (`token_masks.py`), after the finiteness check: a masked logit is -inf on purpose.
    """
    assert logprobs_out is None or not (all_greedy or top_k_bound), "log-probabilities rank every token"
    finite = torch.isfinite(logits).all(dim=-1)  # [B]
    if allowed is not None:
        logits = mask_disallowed(logits, allowed)
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if counts is not None:
        logits = apply_reply_penalties(logits, counts, params)
    chosen = logits.argmax(dim=-1)
    if not all_greedy:
        drawn = draw_from_nucleus(logits, params, seeds, counters, top_k_bound, logprobs_out)
        chosen = torch.where(params.temperature.squeeze(1) == 0, chosen, drawn)
    return torch.where(finite, chosen, NON_FINITE)


def draw_from_nucleus(
    logits: torch.Tensor,
    params: SamplingTensors,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    top_k_bound: int | None,
    logprobs_out: LogprobRows | None = None,
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
    if params.min_p is not None:
        # min-p keeps tokens at least min_p times as likely as the likeliest: a cut on the logit
        # (log(0) = -inf keeps all). Kept tokens stay a prefix of the ranking.
        in_top_k = in_top_k & (ranked >= ranked[:, :1] + torch.log(params.min_p))
    greedy = params.temperature == 0  # [B, 1]: its draw is not used; its log-probs cut nothing
    if logprobs_out is not None:
        in_top_k = in_top_k | greedy
    probs = torch.softmax(ranked.masked_fill(~in_top_k, float("-inf")), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    # Kept tokens form a prefix of the ranking (top-k and top-p both cut at a rank), so the
    # nucleus's CDF is `cdf` up to its last kept rank.
    nucleus = in_top_k & (cdf - probs < params.top_p)
    if logprobs_out is not None:
        nucleus = nucleus | greedy
    kept = nucleus.sum(dim=-1, keepdim=True).clamp(min=1)  # [B, 1]
    total = cdf.gather(-1, kept - 1)  # [B, 1]
    target = uniform_from_counter(seeds, counters).unsqueeze(1) * total
    # Rounding can put `target` at the CDF's end: clamp to the last kept rank.
    pick = torch.minimum(torch.searchsorted(cdf, target, right=True), kept - 1)
    if logprobs_out is not None:
        masked = ranked.masked_fill(~in_top_k, float("-inf"))
        logp = (torch.log_softmax(masked, dim=-1) - torch.log(total)).masked_fill(rank >= kept, float("-inf"))
        write_logprobs(logprobs_out, logp, order, torch.where(greedy, 0, pick))
    return order.gather(-1, pick).squeeze(1)


def write_logprobs(
    out: LogprobRows, logp: torch.Tensor, order: torch.Tensor, chosen_rank: torch.Tensor
) -> None:
    """logp, order: [B, V] in rank order; chosen_rank: long [B, 1], the sampled token's rank (a
    greedy row's token is the first: `argmax` and the stable sort agree on ties)."""
    k = out.top_values.shape[-1]
    out.top_values.copy_(logp[:, :k])
    out.top_ids.copy_(order[:, :k])
    out.chosen.copy_(logp.gather(-1, chosen_rank).squeeze(1))


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
