"""The batched engine: continuous batching, every active request shares each decode step.

It knows token ids only: prompt ids in, `TokenEvent`s out (see `requests.py`). One thread owns
the model, the KV cache and, on CUDA, the captured graphs: CUDA-graph state is thread-local, so
capture and replay both happen there, and callers only ever touch the queue. Each iteration:

1) drops cancelled requests, freeing their slots at once;
2) moves live requests down into rows that requests ended in (`slots.SlotTable.compact_once`);
3) admits waiting requests (FIFO) while slots are free, each starting from the longest prefix
   of its prompt that a kept cache of the same visitor holds (`prefix_cache.py`): the next turn
   of a conversation, a retry, an edit or a continue prefills only what is new;
4) runs one decode step for all slots past their prompt: forward and per-row sampling on the
   device (`decode_step.decode_and_sample`), replayed as a CUDA graph at a padded batch size
   (`use_graphs`), or run eagerly;
5) prefills what is left of the step's token budget (`chunk_size` tokens, one spent by each
   decoding stream): the oldest prompt's next chunk and every short prompt that fits, no prompt
   more than `prompt_chunk` tokens, packed into one forward without padding
   (`scheduling.budget_rows`, `packed.prefill`). A long prompt
   costs the other streams one bounded chunk per step, and a short chat's first token does not
   wait for it to end. `policy="mixed"` (the default without CUDA graphs) runs 4) and 5) as one
   eager forward; `policy="fcfs"` is
   the policy before (prefill first, oldest prompt first, rows padded: `scheduling.prefill_rows`),
   kept for `bench/scheduling.py` to compare against.

Row b of a decode step is slot b, so a step at batch B covers slots [0, B); live requests are
kept in the lowest rows, so B follows how many are live, however many kept caches sit above
them. Rows that are not decoding (free, kept, or still prefilling) ride along harmlessly: they
write past the ring's end. A request that ends (finished, at its limit, or stopped) keeps its
cache in its slot until a new request needs the room (the least recently used goes first).
Errors are values: a failed prefill or decode step fails the requests in it (and only those,
and keeps nothing of theirs), a row whose logits are not finite fails its own request, and the
engine keeps serving.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable

import torch

from . import capture, decode_step, device, hf_weights, key_groups, kv_cache
from .decode_launches import DecodeSteps
from .prompt_steps import PromptSteps
from .requests import (
    NON_FINITE_MESSAGE,
    RequestHandle,
    RequestQueue,
    TokenEvent,
    TokenLogprobs,
    describe_failure,
)
from .sampling import NON_FINITE
from .scheduling import POLICIES, Slot, budget_rows, prefill_rows
from .slots import MoveFailed, SlotTable
from .step_options import StepOptions, defaults_for
from .token_masks import GRAMMAR_REFUSED, TokenMasks
from .warmup import WarmUpAbandoned, WarmUpFailed, capture_every_shape, stage, time_replays

log = logging.getLogger(__name__)

CHUNK_SIZE = 512  # the token budget of a step (fcfs: prompt tokens prefilled per iteration)
# The most prompt tokens one prompt takes in a step while streams decode (`scheduling.budget_rows`),
# by device: it bounds how long a step is while a long prompt goes in. On a CPU even one prompt
# token beside a decode row costs a large share of a step (a matrix product of 2 rows takes 2x
# one of 1 there), so the chunk is small: with 4 tokens a stream's largest gap was 2.2x its median
# in bench/scheduling.py, where 16 gave 2.8x. On a GPU a step's weights cost the same for a few
# hundred tokens as for one, so it is the whole budget.
PROMPT_CHUNK = {"cpu": 4}
# The longest prompt that goes in whole, in one step, by device (default: four chunks). A new
# chat's first token should not wait for 16 steps of 4 tokens on a CPU.
WHOLE_PROMPT = {"cpu": 64}
ProgressCallback = Callable[[str, "float | None"], None]


class BatchedEngine(DecodeSteps, PromptSteps, RequestQueue):
    """Serves many requests at once from a slot-indexed static KV cache; see the module docstring."""

    returns_logprobs = True  # for requests whose params ask (`SamplingParams.logprobs`)

    def __init__(
        self,
        model,
        stop_ids: Iterable[int],
        context_length: int,
        slots: int | None = None,
        chunk_size: int = CHUNK_SIZE,
        use_graphs: bool | None = None,
        compile_step: bool = False,
        on_progress: ProgressCallback | None = None,
        prefix_cache: str = "private",
        policy: str | None = None,
        prompt_chunk: int | None = None,
        step_options: StepOptions | None = None,
        whole_prompt: int | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if prompt_chunk is not None and prompt_chunk < 1:
            raise ValueError(f"prompt_chunk must be positive, got {prompt_chunk}")
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        super().__init__()
        self.weights = hf_weights.weights_from_hf(model)
        self.device = self.weights.device
        self.stop_ids = frozenset(stop_ids)
        self.context_length = context_length
        self.chunk_size = chunk_size
        self.prompt_chunk = min(chunk_size, prompt_chunk or PROMPT_CHUNK.get(self.device.type, chunk_size))
        # The longest prompt that goes in whole, in one step (None: `scheduling.WHOLE_CHUNKS` chunks).
        self.whole_prompt = whole_prompt or (
            WHOLE_PROMPT.get(self.device.type) if prompt_chunk is None else None
        )
        # Ring entries per slot (see kv_cache): fewer than the context when the window allows.
        self.cache_len = kv_cache.cache_length(context_length, self.weights.shape.sliding_window, chunk_size)
        self.capacity = slots or device.default_slots(self.device, self.weights, self.cache_len)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        # With graphs the decode step is a graph of its own (`budget`); without, nothing is lost
        # by riding in the prompt chunks' forward (`mixed`; bench/scheduling.py measures both).
        self.policy = policy or ("budget" if self.use_graphs else "mixed")
        self.compile_step = compile_step  # with graphs only: see `decode_step.DecodeGraphs`
        # Which decode-step variant runs (step_options.py): the device check's choice by default.
        self.step_options = step_options or defaults_for(self.device.type)
        self.step_ms: dict[str, float] = {}  # replay times measured at warm-up (CUDA graphs)
        self.pad_batches = self.use_graphs  # round decode batches up to the captured sizes
        self.step_cost: key_groups.StepCost | None = None  # set at the first decode step
        self.batch_sizes = decode_step.batch_buckets(self.capacity, smallest=2 if compile_step else 1)
        device.choose_attention_kernels(self.device)
        self.attention = device.attention_kernel_name(self.device)
        self.staging = device.HostStaging(self.device)
        self.cache: kv_cache.KVCache | None = None
        self.buffers: decode_step.DecodeBuffers | None = None
        self.graphs: decode_step.DecodeGraphs | None = None
        self.masks = TokenMasks(self.capacity, self.weights.shape.vocab, self.device)  # grammars' masks
        self._on_progress = on_progress
        self.warmup_message = "Starting the engine…"
        self.ready_s: float | None = None  # seconds from construction to serving
        self._settled = threading.Event()  # set once warm-up has finished or failed
        # Set when a failed capture left the device or its allocator unusable (capture.py): the
        # ladder then goes on in a fresh process, not in this one.
        self.device_untrusted = False
        self.window = window = self.weights.shape.sliding_window
        self.table = SlotTable(self.capacity, self.cache_len, window, prefix_cache, self._wakeup)
        self._slots = self.table.live  # row -> the live request in it (the table's own list)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._serve, name="orca-batched-engine", daemon=True)
        self._thread.start()

    # -- caller side --
    def position(self, handle: RequestHandle) -> int:
        """0 if the request is generating, done, or about to take a free slot; else its 1-based
        place in line for a slot (a request the engine thread has not admitted yet is not
        waiting while slots are free)."""
        with self._wakeup:
            free = sum(slot is None for slot in self._slots)
            for place, waiting in enumerate(self._pending, start=1):
                if waiting is handle:
                    return max(0, place - free)
        return 0

    @property
    def grammar_vocab(self) -> int:
        """The vocabulary a request's grammar must be compiled for (see token_masks.py)."""
        return self.masks.vocab

    def _count_active(self) -> int:
        return sum(slot is not None for slot in self._slots)

    def _cache_stats(self) -> dict[str, object]:
        return self.table.stats()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once warm-up is done (graphs captured); False on timeout or if warm-up failed
        (then `stats().failure` says why)."""
        return self._settled.wait(timeout) and self.failure is None

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving and release the KV cache, buffers and graphs. A warm-up stuck inside one
        capture cannot be interrupted: it stops at the next stage and releases then."""
        with self._wakeup:
            self._closing = True
            for handle in [*self._pending, *(s.handle for s in self._slots if s is not None)]:
                handle.cancel()
            self._wakeup.notify()
        self._thread.join(timeout)

    # -- engine thread: warm-up --
    def _progress(self, message: str, fraction: float | None = None) -> None:
        self.warmup_message = message
        log.info("%s%s", message, "" if fraction is None else f" ({fraction:.0%})")
        if self._on_progress is not None:
            try:
                self._on_progress(message, fraction)
            except Exception:  # a broken status display must not stop the engine
                log.exception("progress callback failed")

    def _warm_up(self) -> None:
        """Allocate the cache and buffers and, with graphs, capture every decode-step graph."""
        shape, dtype = self.weights.shape, self.weights.dtype
        entries = self.capacity * (self.cache_len + kv_cache.UNUSED_TAIL)
        size = f"{self.capacity} slots of {self.cache_len} entries, "
        size += f"{entries * shape.kv_bytes_per_token(dtype) / 2**30:.1f} GiB"
        with stage(f"allocating the KV cache ({size})"):
            self.cache = kv_cache.allocate_kv_cache(shape, self.capacity, self.cache_len, dtype, self.device)
        with stage("allocating the decode buffers"):
            self.buffers = decode_step.DecodeBuffers.allocate(self.capacity, shape.vocab, self.device, dtype)
        self.table.cache, self.table.buffers = self.cache, self.buffers
        if self.use_graphs:
            self._capture_graphs()
        log.info("attention kernel: %s", self.attention)
        self.ready_s = time.monotonic() - self._started
        self._progress(f"Engine ready in {self.ready_s:.1f}s: {self.capacity} concurrent requests.", 1.0)
        self._settled.set()

    def _capture_graphs(self) -> None:
        with stage("setting up CUDA-graph capture"):
            self.graphs = decode_step.DecodeGraphs(
                self.weights, self.cache, self.buffers, self.compile_step, self.step_options
            )
        capture_every_shape(
            self.graphs,
            self.batch_sizes,
            self.cache_len,
            self.compile_step,
            self._progress,
            lambda: self._closing,
        )
        if self.device.type == "cuda":
            with stage("capturing the decode step"):
                torch.cuda.synchronize(self.device)  # a capture's failure can surface only here
            with stage("timing the decode step"):
                smallest = kv_cache.kv_buckets(self.cache_len)[0]
                shapes = [(self.batch_sizes[0], smallest), (self.capacity, smallest)]
                self.step_ms = time_replays(self.graphs, shapes)
            log.info("decode step (%s): %s", self.step_options.describe(), self.step_ms)

    def _release_device_state(self) -> None:
        """Graphs, buffers and cache go (a closed or failed engine holds no GPU memory)."""
        self.graphs = self.buffers = self.cache = None
        self.table.cache = self.table.buffers = None
        device.release_cached_memory(self.device)

    # -- engine thread: the loop --
    def _serve(self) -> None:
        try:
            with torch.inference_mode():
                self._warm_up()
                while self._wait_for_work():
                    self._iteration()
        except WarmUpAbandoned:
            self.failure = "warm-up was abandoned"
            self._settled.set()
            self._fail_all(self.failure)
        except WarmUpFailed as exc:
            self.failure = str(exc)
            self.device_untrusted = isinstance(exc.__cause__, capture.DeviceUntrusted)
            log.error("engine warm-up failed: %s", exc, exc_info=exc.__cause__)
            self._settled.set()
            self._fail_all(self.failure)
        except BaseException as exc:  # the thread itself is dying: say so, fail everyone
            self.failure = f"the engine stopped: {describe_failure(exc)}"
            log.critical(self.failure, exc_info=True)
            self._settled.set()
            self._fail_all(self.failure)
            raise
        finally:
            self._release_device_state()

    def _wait_for_work(self) -> bool:
        with self._wakeup:
            while not self._pending and not any(self._slots) and not self._closing:
                self._wakeup.wait()
            return not (self._closing and not self._pending and not any(self._slots))

    def _iteration(self) -> None:
        # 1) cancels free their slots before anything runs
        self._drop_cancelled()
        # 2) live requests fill the rows that ended ones left, so a step covers live rows only
        self._compact()
        # 3) waiting requests take free slots, oldest first, from a kept prefix where one fits
        self._admit()
        if self.policy == "fcfs":  # the policy before: a chunk of prompt, then one token each
            self._prefill(prefill_rows(self._active_slots(), self.chunk_size, self.cache_len, self.window))
            self._decode()
            return
        # 4) + 5) one token for every decoding slot, then prompt chunks in the rest of the budget
        rows = budget_rows(self._active_slots(), self.chunk_size, self.prompt_chunk, self.whole_prompt)
        if self.policy == "mixed" and rows and any(s.decoding for s in self._active_slots()):
            self._mixed_step(rows)
            return
        self._decode()
        self._prefill(rows)

    def _drop_cancelled(self) -> None:
        with self._wakeup:
            cancelled = [h for h in self._pending if h.cancelled]
            self._pending = collections.deque(h for h in self._pending if not h.cancelled)
        for handle in cancelled:
            handle.finish("cancelled")
        for slot in self._active_slots():
            if slot.handle.cancelled:
                self._release(slot, "cancelled")

    def _compact(self) -> None:
        while self.table.holes():
            try:
                self.table.compact_once()
            except MoveFailed as failed:
                self._fail([failed.slot], failed.__cause__)

    def _admit(self) -> None:
        while True:
            with self._wakeup:
                if self._count_active() == self.capacity or not self._pending:
                    return
                handle = self._pending.popleft()
            if (problem := self._check_fits(handle) or self.masks.start(handle)) is not None:
                handle.finish("error", problem)
                continue
            slot = self.table.admit(handle)
            self.buffers.set_request(slot.index, handle.params)
            if self._closing:  # close() ran while this request was in neither list, so missed it
                handle.cancel()

    def _check_fits(self, handle: RequestHandle) -> str | None:
        prompt_len, new = len(handle.prompt_ids), handle.params.max_new_tokens
        if prompt_len == 0 or prompt_len + new > self.context_length:
            return (
                f"prompt of {prompt_len} tokens plus {new} new tokens "
                f"does not fit the context of {self.context_length}"
            )
        return None

    def _active_slots(self) -> list[Slot]:
        return [slot for slot in self._slots if slot is not None]

    def _release(self, slot: Slot, reason: str, error: str | None = None) -> None:
        """End the request in `slot`; unless it failed, its cache stays for a later prompt."""
        self.table.release(slot, keep=reason != "error")
        self.masks.forget(slot.handle)
        slot.handle.finish(reason, error)

    def _fail(self, slots: list[Slot], exc: Exception) -> None:
        if device.is_fatal_device_error(exc):
            raise exc  # the CUDA context is gone for everyone: let `_serve` record it and fail all
        log.error("step failed for requests %s", [s.handle.id for s in slots], exc_info=exc)
        for slot in slots:
            self._release(slot, "error", describe_failure(exc))
        device.release_cached_memory(self.device)  # after an OOM, hand the fragments back

    def _fail_all(self, reason: str) -> None:
        with self._wakeup:
            waiting, self._pending = list(self._pending), collections.deque()
            active = [s.handle for s in self._slots if s is not None]
        self.table.clear()
        self.masks.clear()
        for handle in [*waiting, *active]:
            handle.finish("error", reason)

    def _accept(
        self,
        slot: Slot,
        token: int,
        logits: torch.Tensor | None = None,
        logprobs: TokenLogprobs | None = None,
    ) -> None:
        """Stream a sampled token, or finish the request on a stop token or its token limit."""
        slot.took(token)
        if token == NON_FINITE:
            self.non_finite_replies += 1
            log.error("request %s: the model's logits stopped being finite numbers", slot.handle.id)
            self._release(slot, "error", NON_FINITE_MESSAGE)
            return
        if token in self.stop_ids and not slot.handle.params.ignore_eos:
            self._release(slot, "stop")
            return
        if not self.masks.advance(slot.handle, token):
            log.error("request %s: its grammar refused sampled token %s", slot.handle.id, token)
            self._release(slot, "error", GRAMMAR_REFUSED)
            return
        slot.handle.deliver(TokenEvent(token=token, logits=logits, logprobs=logprobs))
        if slot.generated == slot.handle.params.max_new_tokens:
            self._release(slot, "length")
