"""The prompt side of the batched engine's step: prompt chunks into the cache, the first token of
every prompt that is now whole, and (`policy="mixed"`) the decode rows riding in the same forward.

`PromptSteps` is a part of `BatchedEngine` (batched.py), kept apart so that each file reads as
one concern: batched.py runs the loop and admits requests, decode_launches.py runs the decode
step, and this module runs what `scheduling.budget_rows` (or `prefill_rows` for `fcfs`) chose
for prompts. It uses the engine's weights, cache, buffers, staging and grammar masks, and its
`_fail` and `_accept`. A failed forward fails the requests in it, and only those.
"""

from __future__ import annotations

import torch

from . import decode_step, mistral, packed
from .scheduling import Slot, eager_shortcuts
from .step_results import recorded_logits, token_logprobs, wants_logprobs


class PromptSteps:
    """`BatchedEngine`'s prompt-side steps (a mixin: the engine's state is its own)."""

    def _prefill(self, rows: list[tuple[Slot, int]]) -> None:
        if not rows:
            return
        try:
            logits = self._prefill_forward(rows)  # [D, V]: the chunks that end their prompt
        except Exception as exc:  # the requests in this forward only
            self._fail([slot for slot, _ in rows], exc)
            return
        self._prefilled(rows, logits)

    def _prefilled(self, rows: list[tuple[Slot, int]], logits: torch.Tensor) -> None:
        """These chunks are in the cache: count them, and stream the first token of every
        prompt that is now whole (logits [D, V], one row per such prompt, in `rows` order)."""
        padded_to = max(take for _, take in rows) if self.policy == "fcfs" else 0  # fcfs pads rows
        for slot, take in rows:
            slot.wrote(slot.prefilled + max(take, padded_to))
            slot.prefilled += take
            slot.chunked = not slot.decoding
            self.table.prompt_tokens_prefilled += take
        finished = [slot for slot, _ in rows if slot.decoding]
        if finished:
            try:
                self._first_tokens(finished, logits)
            except Exception as exc:  # the requests whose first token this was
                self._fail(finished, exc)

    def _prefill_forward(self, rows: list[tuple[Slot, int]]) -> torch.Tensor:
        """The forward of these chunks; the logits of those that end their prompt, [D, V]."""
        chunks, ending = self._chunks(rows), ends_prompt(rows)
        if self.policy == "fcfs":
            return mistral.prefill(self.weights, self.cache, chunks, self.staging.to_device)[ending]
        return packed.prefill(self.weights, self.cache, chunks, self.staging.to_device, logits_for=ending)[0]

    @staticmethod
    def _chunks(rows: list[tuple[Slot, int]]) -> list[mistral.PromptChunk]:
        return [
            mistral.PromptChunk(
                slot.index, slot.prefilled, slot.handle.prompt_ids[slot.prefilled : slot.prefilled + take]
            )
            for slot, take in rows
        ]

    def _first_tokens(self, slots: list[Slot], logits: torch.Tensor) -> None:
        """These prompts are in: sample every first token from their last logits [N, V] in one
        sampler run (`decode_step.sample_first_tokens`), and stream them."""
        tokens, logprobs = decode_step.sample_first_tokens(
            self.buffers,
            logits,
            [slot.index for slot in slots],
            [slot.handle.prompt_ids for slot in slots],
            eager_shortcuts([slot.handle.params for slot in slots]),
            self.staging.to_device,
            keep_logprobs=wants_logprobs(slots),
            allowed=self.masks.first_masks([slot.handle for slot in slots], self.device),
        )
        recorded = recorded_logits(slots, lambda i, slot: logits[i])
        asked = token_logprobs(slots, logprobs, range(len(slots)))
        for slot, token in zip(slots, tokens):
            self._accept(slot, token, recorded.get(slot.index), asked.get(slot.index))

    def _mixed_step(self, rows: list[tuple[Slot, int]]) -> None:
        """`policy="mixed"`: every decoding slot's token and the prompt chunks `rows` in one eager
        forward (`packed.prefill` with decode rows), then the decode rows' sampling as the decode
        step does it. A failure fails every request in the forward."""
        decoding = [s for s in self._slots if s is not None and s.decoding]
        batch = max(s.index for s in decoding) + 1
        try:
            kv_len, masked = self._decode_inputs(batch)
            decode_rows = packed.DecodeRows(
                self.buffers.tokens[:batch], self.buffers.positions[:batch], kv_len
            )
            chunks = self._chunks(rows)
            prompt_logits, logits = packed.prefill(
                self.weights, self.cache, chunks, self.staging.to_device, decode_rows, ends_prompt(rows)
            )
            all_greedy, top_k_bound = eager_shortcuts([s.handle.params for s in decoding])
            tokens = packed.sample_decode_rows(
                self.buffers,
                logits,
                batch,
                all_greedy=all_greedy,
                top_k_bound=top_k_bound,
                keep_logits=any(s.handle.record_logits for s in decoding),
                keep_logprobs=wants_logprobs(decoding),
                apply_mask=masked,
            )
            recorded = recorded_logits(decoding, lambda i, slot: self.buffers.logits[slot.index])
            asked = token_logprobs(decoding, self.buffers.logprobs, [slot.index for slot in decoding])
        except Exception as exc:
            self._fail([*decoding, *(slot for slot, _ in rows)], exc)
            return
        for slot in decoding:
            self._accept(slot, tokens[slot.index], recorded.get(slot.index), asked.get(slot.index))
        self._prefilled(rows, prompt_logits)


def ends_prompt(rows: list[tuple[Slot, int]]) -> list[int]:
    """The indices of the rows whose chunk is the last of its prompt (checked before the forward)."""
    return [index for index, (slot, take) in enumerate(rows) if slot.prefilled + take == slot.prompt_len]
