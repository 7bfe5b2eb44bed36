"""The decode side of the batched engine's step: every decoding stream's next token, in one
launch, or two when one long chat would make every row read its keys (`key_groups.py`); each
launch a captured CUDA graph replayed at a padded batch, or the eager step.

`DecodeSteps` is a part of `BatchedEngine` (batched.py), as `PromptSteps` (prompt_steps.py) is
its prompt side: batched.py runs the loop and admits requests. It uses the engine's weights,
cache, buffers, staging, graphs and grammar masks, and its `_fail` and `_accept`. A failed
launch fails the requests in that step, and only those.
"""

from __future__ import annotations

from . import decode_step, key_groups, kv_cache
from .scheduling import Slot, eager_shortcuts
from .step_results import recorded_logits, token_logprobs, wants_logprobs


class DecodeSteps:
    """`BatchedEngine`'s decode-side steps (a mixin: the engine's state is its own)."""

    def _decode(self) -> None:
        rows = [s for s in self._slots if s is not None and s.decoding]
        if not rows:
            return
        results: dict[int, tuple] = {}
        try:
            for group in self._key_groups(rows):
                tokens = self._run_decode_step(group.batch, group.kv_len, group.rows)
                ours = [slot for slot in rows if slot.index in group.rows]
                recorded = recorded_logits(ours, lambda i, slot: self.buffers.logits[slot.index])
                asked = token_logprobs(ours, self.buffers.logprobs, [slot.index for slot in ours])
                for slot in ours:
                    results[slot.index] = (
                        tokens[slot.index],
                        recorded.get(slot.index),
                        asked.get(slot.index),
                    )
        except Exception as exc:  # every request in the step
            self._fail(rows, exc)
            return
        for slot in rows:
            self._accept(slot, *results[slot.index])

    def _key_groups(self, rows: list[Slot]) -> list[key_groups.KeyGroup]:
        """One launch, or two when one long chat would make every row read its keys (key_groups.py)."""
        positions = {slot.index: slot.prompt_len + slot.generated - 1 for slot in rows}  # slot.next_position
        if self.step_cost is None:
            self.step_cost = key_groups.step_cost(self.weights, self.cache)
        return key_groups.key_groups(positions, self.cache_len, self._step_batch, self.step_cost)

    def _step_batch(self, rows: int) -> int:
        """The batch a step over slots [0, rows) runs at: a captured size with graphs."""
        return decode_step.batch_bucket(rows, self.batch_sizes) if self.pad_batches else rows

    def _run_decode_step(self, batch: int, kv_len: int, live: tuple[int, ...]) -> list[int]:
        """Fill rows [0, batch) of the input buffers (`live` decoding, the others riding along),
        run the step over `kv_len` keys, read the sampled tokens back."""
        masked = self._decode_inputs(batch, live)[1]
        if self.graphs is not None:
            self.graphs.replay(batch, kv_len)
        else:
            decoding = [self._slots[index] for index in live]
            keep_logits = any(s.handle.record_logits for s in decoding)
            shortcuts = eager_shortcuts([s.handle.params for s in decoding])
            self.eager_step(batch, kv_len, *shortcuts, keep_logits, wants_logprobs(decoding), masked)
        return self.buffers.next[:batch].tolist()  # the one host sync per launch

    def _decode_inputs(self, batch: int, live: tuple[int, ...] | None = None) -> tuple[int, bool]:
        """Fill rows [0, batch) of the decode input buffers (tokens, positions and the grammar
        masks) for the decoding slots among them (those in `live`, if given); returns the key
        length they need and whether any of them is constrained. Other rows ride along at
        position -1 (see `mistral.step_context`)."""
        tokens, positions = [0] * batch, [-1] * batch
        decoding_rows: list = [None] * batch
        for index in range(batch):
            slot = self._slots[index]
            if slot is not None and slot.decoding and (live is None or index in live):
                position = positions[index] = slot.prompt_len + slot.generated - 1  # slot.next_position
                tokens[index] = slot.last_token
                slot.high_water = max(slot.high_water, position + 1)
                decoding_rows[index] = slot.handle
        kv_len = kv_cache.kv_bucket(max(positions) + 1, self.cache_len)
        masked = self.masks.step_mask(decoding_rows, self.buffers.allowed)
        self.staging.copy_into(
            [self.buffers.tokens[:batch], self.buffers.positions[:batch]], [tokens, positions]
        )
        return kv_len, masked

    def eager_step(
        self,
        batch: int,
        kv_len: int,
        all_greedy: bool,
        top_k_bound: int | None,
        keep_logits: bool = False,
        keep_logprobs: bool = False,
        apply_mask: bool = False,
    ) -> None:
        """The eager decode step (CPU, or CUDA without graphs); tests patch this to inject faults."""
        decode_step.decode_and_sample(
            self.weights,
            self.cache,
            self.buffers,
            batch,
            kv_len,
            all_greedy,
            top_k_bound,
            keep_logits,
            keep_logprobs,
            apply_mask,
            self.step_options,
        )
