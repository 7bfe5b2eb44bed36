"""Choosing the next token from logits, per row, with each row's own sampling parameters.

Everything is tensor arithmetic over a batch (no Python branch per row), so the same function
serves the one-request CPU engine and a batched GPU step. The order matches transformers'
`generate`: repetition penalty, temperature, top-k, top-p, then a draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import SamplingParams


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


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the prompt or reply.

    logits: [B, V] float; seen: [B, V] bool; penalty: [B, 1].
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus with -inf. logits: [B, V]."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    k = torch.where(top_k > 0, top_k, vocab)  # [B, 1]
    outside = rank >= k
    probs = torch.softmax(sorted_logits.masked_fill(outside, float("-inf")), dim=-1)
    # A token stays while the mass before it is below top_p, so the top token always stays.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    outside |= mass_before >= top_p
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next_tokens(
    logits: torch.Tensor,
    params: SamplingTensors,
    seen: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row. logits: [B, V]; seen: [B, V] bool. Returns long [B]."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    greedy_choice = logits.argmax(dim=-1)
    greedy = params.temperature.squeeze(1) == 0
    if bool(greedy.all()):
        return greedy_choice
    scaled = logits / torch.where(params.temperature > 0, params.temperature, 1.0)
    filtered = filter_top_k_top_p(scaled, params.top_k, params.top_p)
    drawn = torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=generator).squeeze(1)
    return torch.where(greedy, greedy_choice, drawn)
