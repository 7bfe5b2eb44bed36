"""Constrained decoding in the batched engine: a token bitmask per step, one row per slot.

A request whose `SamplingParams.constraint` holds a compiled grammar (`orca_space.grammar`)
gets a matcher on the host when it is admitted. Before each step the host fills that request's
row of an int32 bitmask (one bit per token) from its matcher; every other row allows every
token. The bitmask is one more input buffer of the step (`DecodeBuffers.allowed`), so
constrained and free requests share a batch and the captured CUDA graph: the step sets the
disallowed tokens' logits to -inf before the sampler sees them (`mask_disallowed`). Each
sampled token then advances its request's matcher.

While no row is constrained (and none was at the last step) nothing is filled or copied, and
an eager step skips the masking: free traffic pays nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..grammar import TokenMatcher, bitmask_width
from .requests import RequestHandle

ALL_ALLOWED = -1  # an int32 with every bit set
GRAMMAR_REFUSED = "the reply left its grammar (a token the mask allowed was refused); please report this"


def mask_disallowed(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`logits` [B, V] with every token whose bit is 0 in `allowed` (int32 [B, ceil(V/32)]) at
    -inf. Pure tensor arithmetic, so it runs inside a captured graph."""
    bits = torch.arange(32, device=allowed.device, dtype=torch.int32)
    keep = ((allowed.unsqueeze(-1) >> bits) & 1).flatten(1)[:, : logits.shape[-1]]  # [B, V]
    return logits.masked_fill(keep == 0, float("-inf"))


class TokenMasks:
    """Each constrained request's matcher, and the host side of the step's bitmask."""

    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.width = bitmask_width(vocab)
        pinned = device.type == "cuda"  # a copy from pinned memory does not wait for the host
        self.host = torch.full((slots, self.width), ALL_ALLOWED, dtype=torch.int32, pin_memory=pinned)
        self._matchers: dict[int, TokenMatcher] = {}  # request id -> its place in its grammar
        self._constrained_rows: set[int] = set()  # device rows the last copy left not all-allowed

    def start(self, handle: RequestHandle) -> str | None:
        """A request is admitted: make its matcher. Returns why it cannot be served, if so."""
        constraint = handle.params.constraint
        if constraint is None:
            return None
        if constraint.vocab_size != self.vocab:
            return f"the grammar was compiled for {constraint.vocab_size} tokens; the model has {self.vocab}"
        self._matchers[handle.id] = constraint.matcher()
        return None

    def forget(self, handle: RequestHandle) -> None:
        self._matchers.pop(handle.id, None)

    def clear(self) -> None:
        self._matchers.clear()

    def advance(self, handle: RequestHandle, token: int) -> bool:
        """A token was sampled for `handle`: move its matcher on. False if its grammar refuses
        the token (the mask makes that impossible; an engine bug if it happens)."""
        matcher = self._matchers.get(handle.id)
        return matcher is None or matcher.accept(token)

    def step_mask(self, rows: Sequence[RequestHandle | None], target: torch.Tensor) -> bool:
        """Fill `target` (the step's `allowed` buffer, [S, W] on the device) for a step whose row
        i decodes `rows[i]` (None: nothing, or nothing to read). Returns whether any row is
        constrained, i.e. whether an eager step must apply the mask."""
        constrained = {
            i for i, handle in enumerate(rows) if handle is not None and handle.id in self._matchers
        }
        if not constrained and not self._constrained_rows:
            return False  # the device rows are all-allowed already
        end = max(len(rows), max(self._constrained_rows, default=-1) + 1)
        self.host[:end] = ALL_ALLOWED
        for row in constrained:
            self._matchers[rows[row].id].fill(self.host, row)
        target[:end].copy_(self.host[:end], non_blocking=True)
        self._constrained_rows = constrained
        return bool(constrained)

    def first_masks(self, handles: Sequence[RequestHandle], device: torch.device) -> torch.Tensor | None:
        """The bitmask [N, W] for the first tokens of these just-prefilled requests, or None when
        none is constrained."""
        if not any(handle.id in self._matchers for handle in handles):
            return None
        masks = torch.full((len(handles), self.width), ALL_ALLOWED, dtype=torch.int32)
        for row, handle in enumerate(handles):
            if (matcher := self._matchers.get(handle.id)) is not None:
                matcher.fill(masks, row)
        return masks.to(device)


class GrammarLogitsProcessor:
    """The same mask for transformers' `generate` (the reference rung): a logits processor that
    advances the request's matcher with each token `generate` appended, then masks the scores.
    transformers runs custom processors after its penalties and before temperature, top-k and
    top-p, as the batched engine's sampler orders them."""

    def __init__(self, constraint, prompt_len: int) -> None:
        self.matcher = constraint.matcher()
        self.consumed = prompt_len  # input_ids up to here are the prompt or already accepted
        self.bitmask = torch.full((1, bitmask_width(constraint.vocab_size)), ALL_ALLOWED, dtype=torch.int32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for token in input_ids[0, self.consumed :].tolist():
            if not self.matcher.accept(token):
                raise RuntimeError(GRAMMAR_REFUSED)
        self.consumed = input_ids.shape[1]
        self.matcher.fill(self.bitmask, 0)
        return mask_disallowed(scores, self.bitmask.to(scores.device))
