"""The in-process engine: continuous batching, every active request shares each decode step.

It knows token ids only: prompt ids in, `TokenEvent`s out (see `requests.py`). One thread owns
the model, the KV cache and, on CUDA, the captured graphs: CUDA-graph state is thread-local, so
capture and replay both happen there, and callers only ever touch the queue. Each iteration:

1) drops cancelled requests, freeing their slots at once;
2) admits waiting requests (FIFO) into free slots of the static KV cache;
3) prefills up to `chunk_size` prompt tokens (oldest request first, several short prompts in
   one forward), so a long prompt costs the other streams one chunk of delay per step instead
   of freezing them;
4) runs one decode step for all slots past their prompt: forward and per-row sampling on the
   device (`decode_step.decode_and_sample`), replayed as a CUDA graph at a padded batch size.

Row b of a decode step is slot b, so a step at batch B covers slots [0, B); new requests take
the lowest free slot to keep B small. Rows that are not decoding (free, or still prefilling)
ride along harmlessly: they write at their slot's next position, an entry the slot's own request
overwrites before reading and whose old key no query of it can see any more. Errors are values:
a failed prefill or decode step fails the requests in it (and only those), and the
engine keeps serving.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..params import SamplingParams
from . import decode_step, kv_cache, mistral
from .requests import EngineStats, RequestHandle, TokenEvent, describe_failure
from .sampling import NON_FINITE, sample_next_tokens

log = logging.getLogger(__name__)

CHUNK_SIZE = 512  # prompt tokens prefilled per loop iteration
CPU_SLOTS = 4  # on the CPU there is no memory to plan; a few slots show the batching
NON_FINITE_MESSAGE = (
    "the model's numbers overflowed while writing this reply (its next-token scores were not "
    "finite), so it was stopped rather than shown as nonsense; try again, or lower the temperature"
)
ProgressCallback = Callable[[str, "float | None"], None]


@dataclass
class Slot:
    """A request holding one row of the KV cache."""

    handle: RequestHandle
    index: int
    prefilled: int = 0  # prompt tokens already in the cache
    generated: int = 0  # tokens sampled so far, a final stop token included
    last_token: int = 0  # the latest sampled token: the next decode step's input

    @property
    def prompt_len(self) -> int:
        return len(self.handle.prompt_ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt_len

    @property
    def next_position(self) -> int:
        """Where this slot writes next: its next prompt token, or its last sampled token."""
        return self.prompt_len + self.generated - 1 if self.decoding else self.prefilled


def default_slots(device: torch.device, weights: mistral.MistralWeights, cache_len: int) -> int:
    if device.type != "cuda":
        return CPU_SLOTS
    # Stacking the projections (mistral.stacked_rows) freed the old weights into PyTorch's cache,
    # which the driver still counts as used: hand it back first.
    torch.cuda.empty_cache()
    free_bytes, _ = torch.cuda.mem_get_info(device)
    # What stays cached is a hole between live weights (transformers loads them into one block):
    # no use to a KV cache allocated whole. Logged, so a GPU run shows whether it matters.
    stranded = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    log.info(
        "planning KV slots: %.1f GiB free, %.1f GiB cached in holes", free_bytes / 2**30, stranded / 2**30
    )
    bytes_per_token = weights.shape.kv_bytes_per_token(weights.dtype)
    slots = kv_cache.plan_capacity(free_bytes, bytes_per_token, cache_len)
    if slots == 0:
        raise torch.cuda.OutOfMemoryError(
            f"no room for even one {cache_len}-entry KV cache ({bytes_per_token * cache_len / 2**30:.1f} "
            f"GiB) in the {free_bytes / 2**30:.1f} GiB left after loading; lower --context-length"
        )
    return slots


class BatchedEngine:
    """Serves many requests at once from a slot-indexed static KV cache; see the module docstring."""

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
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.weights = mistral.weights_from_hf(model)
        self.device = self.weights.device
        self.stop_ids = frozenset(stop_ids)
        self.context_length = context_length
        self.chunk_size = chunk_size
        # Ring entries per slot (see kv_cache): fewer than the context when the window allows.
        self.cache_len = kv_cache.cache_length(context_length, self.weights.shape.sliding_window, chunk_size)
        self.capacity = slots or default_slots(self.device, self.weights, self.cache_len)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.compile_step = compile_step  # with graphs only: see `decode_step.DecodeGraphs`
        self.pad_batches = self.use_graphs  # round decode batches up to the captured sizes
        self.batch_sizes = decode_step.batch_buckets(self.capacity, smallest=2 if compile_step else 1)
        self._on_progress = on_progress
        self.warmup_message = "Starting the engine…"
        self.ready_s: float | None = None  # seconds from construction to serving
        self._settled = threading.Event()  # set once warm-up has finished or failed
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._wakeup = threading.Condition()
        self._slots: list[Slot | None] = [None] * self.capacity
        self._closing = False
        self.failure: str | None = None
        self.non_finite_replies = 0  # requests ended because their logits were not finite
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._serve, name="orca-batched-engine", daemon=True)
        self._thread.start()

    # -- caller side --
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        handle = RequestHandle(list(prompt_ids), params)
        with self._wakeup:
            if self.failure or self._closing:
                handle.finish("error", self.failure or "the engine is shutting down")
                return handle
            self._pending.append(handle)
            self._wakeup.notify()
        return handle

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

    def stats(self) -> EngineStats:
        with self._wakeup:
            queued = sum(not h.cancelled for h in self._pending)
            active = sum(slot is not None for slot in self._slots)
        return EngineStats(
            alive=self._thread.is_alive(),
            active=active,
            queued=queued,
            capacity=self.capacity,
            failure=self.failure,
            non_finite_replies=self.non_finite_replies,
        )

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once warm-up is done (graphs captured); False on timeout or if warm-up failed
        (then `stats().failure` says why)."""
        return self._settled.wait(timeout) and self.failure is None

    def close(self, timeout: float = 10.0) -> None:
        with self._wakeup:
            self._closing = True
            for handle in [*self._pending, *(s.handle for s in self._slots if s is not None)]:
                handle.cancel()
            self._wakeup.notify()
        self._thread.join(timeout)

    # -- engine thread: setup --
    def _progress(self, message: str, fraction: float | None = None) -> None:
        self.warmup_message = message
        log.info("%s%s", message, "" if fraction is None else f" ({fraction:.0%})")
        if self._on_progress is not None:
            try:
                self._on_progress(message, fraction)
            except Exception:  # a broken status display must not stop the engine
                log.exception("progress callback failed")

    def _warm_up(self) -> None:
        """Allocate the cache and buffers and, on CUDA, capture every decode-step graph."""
        shape = self.weights.shape
        self.cache = kv_cache.allocate_kv_cache(
            shape, self.capacity, self.cache_len, self.weights.dtype, self.device
        )
        self.buffers = decode_step.DecodeBuffers.allocate(self.capacity, shape.vocab, self.device)
        self.graphs = (
            decode_step.DecodeGraphs(self.weights, self.cache, self.buffers, self.compile_step)
            if self.use_graphs
            else None
        )
        if self.graphs is not None:
            shapes = [
                (batch, kv_len) for batch in self.batch_sizes for kv_len in kv_cache.kv_buckets(self.cache_len)
            ]
            for done, (batch, kv_len) in enumerate(shapes):
                if done == 0 and self.compile_step:  # the first capture compiles: most of a minute, silent
                    message = "Compiling the decode step (a minute or so), then capturing it…"
                else:
                    message = (
                        f"Capturing decode steps ({done + 1} of {len(shapes)}: batch {batch}, {kv_len} keys)…"
                    )
                self._progress(message, done / len(shapes))
                self.graphs.capture(batch, kv_len)
            torch.cuda.synchronize(self.device)
        self.ready_s = time.monotonic() - self._started
        self._progress(f"Engine ready in {self.ready_s:.1f}s: {self.capacity} concurrent requests.", 1.0)
        self._settled.set()

    # -- engine thread: the loop --
    def _serve(self) -> None:
        try:
            with torch.inference_mode():
                self._warm_up()
                while self._wait_for_work():
                    self._iteration()
        except BaseException as exc:  # the thread itself is dying: say so, fail everyone
            self.failure = f"the engine stopped: {describe_failure(exc)}"
            log.critical(self.failure, exc_info=True)
            self._settled.set()
            self._fail_all(self.failure)
            raise

    def _wait_for_work(self) -> bool:
        with self._wakeup:
            while not self._pending and not any(self._slots) and not self._closing:
                self._wakeup.wait()
            return not (self._closing and not self._pending and not any(self._slots))

    def _iteration(self) -> None:
        # 1) cancels free their slots before anything runs
        self._drop_cancelled()
        # 2) waiting requests take free slots, oldest first
        self._admit()
        # 3) a bounded amount of prompt, so running streams keep flowing
        self._prefill()
        # 4) one token for every decoding slot
        self._decode()

    def _drop_cancelled(self) -> None:
        with self._wakeup:
            cancelled = [h for h in self._pending if h.cancelled]
            self._pending = collections.deque(h for h in self._pending if not h.cancelled)
        for handle in cancelled:
            handle.finish("cancelled")
        for slot in self._active_slots():
            if slot.handle.cancelled:
                self._release(slot, "cancelled")

    def _admit(self) -> None:
        while True:
            with self._wakeup:
                free = next((i for i, s in enumerate(self._slots) if s is None), None)
                if free is None or not self._pending:
                    return
                handle = self._pending.popleft()
                problem = self._check_fits(handle)
                if problem is None:
                    self._slots[free] = Slot(handle, free)
            if problem is not None:
                handle.finish("error", problem)
            else:
                self._set_sampling_row(free, handle.params)

    def _check_fits(self, handle: RequestHandle) -> str | None:
        prompt_len, new = len(handle.prompt_ids), handle.params.max_new_tokens
        if prompt_len == 0 or prompt_len + new > self.context_length:
            return (
                f"prompt of {prompt_len} tokens plus {new} new tokens "
                f"does not fit the context of {self.context_length}"
            )
        return None

    def _set_sampling_row(self, index: int, params: SamplingParams) -> None:
        """Write a request's sampling parameters into its slot's row of the decode buffers."""
        b = self.buffers
        b.sampling.temperature[index] = params.temperature
        b.sampling.top_p[index] = params.top_p
        b.sampling.top_k[index] = params.top_k
        b.sampling.repetition_penalty[index] = params.repetition_penalty
        seed = params.seed if params.seed is not None else random.randrange(2**32)
        b.seeds[index] = (seed ^ (seed >> 32)) & 0xFFFFFFFF

    def _active_slots(self) -> list[Slot]:
        return [slot for slot in self._slots if slot is not None]

    def _release(self, slot: Slot, reason: str, error: str | None = None) -> None:
        with self._wakeup:
            self._slots[slot.index] = None
        slot.handle.finish(reason, error)

    def _fail(self, slots: list[Slot], exc: Exception) -> None:
        if is_fatal_device_error(exc):
            raise exc  # the CUDA context is gone for everyone: let `_serve` record it and fail all
        log.error("step failed for requests %s", [s.handle.id for s in slots], exc_info=exc)
        for slot in slots:
            self._release(slot, "error", describe_failure(exc))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # after an OOM, hand the fragments back

    def _fail_all(self, reason: str) -> None:
        with self._wakeup:
            waiting, self._pending = list(self._pending), collections.deque()
            active = [s.handle for s in self._slots if s is not None]
            self._slots = [None] * self.capacity
        for handle in [*waiting, *active]:
            handle.finish("error", reason)

    # -- prefill --
    def _prefill(self) -> None:
        rows = self._prefill_rows()
        if not rows:
            return
        try:
            logits = self._prefill_forward(rows)  # [N, V]
        except Exception as exc:  # the requests in this forward only
            self._fail([slot for slot, _ in rows], exc)
            return
        for slot, take in rows:
            slot.prefilled += take
        done = [index for index, (slot, _) in enumerate(rows) if slot.decoding]
        if done:
            finished = [rows[index][0] for index in done]
            try:
                self._first_tokens(finished, logits[done])
            except Exception as exc:  # the requests whose first token this was
                self._fail(finished, exc)

    def _prefill_rows(self) -> list[tuple[Slot, int]]:
        """Which prompts to prefill now, and how many tokens of each: the oldest first, and more
        in the same forward while all of them, padded to the longest, fit `chunk_size` tokens.

        Many short prompts arriving together then cost one forward, not one each: on CUDA an
        eager forward is hundreds of kernel launches, whatever its length.
        """
        rows: list[tuple[Slot, int]] = []
        width = 0
        for slot in sorted(self._active_slots(), key=lambda s: s.handle.id):  # oldest first
            if slot.decoding:
                continue
            take = min(self.chunk_size, slot.prompt_len - slot.prefilled)
            if rows and (len(rows) + 1) * max(width, take) > self.chunk_size:
                break  # first come, first served: no younger prompt jumps this one
            rows.append((slot, take))
            width = max(width, take)
        return rows

    def _prefill_forward(self, rows: list[tuple[Slot, int]]) -> torch.Tensor:
        chunks = [
            mistral.PromptChunk(
                slot.index, slot.prefilled, slot.handle.prompt_ids[slot.prefilled : slot.prefilled + take]
            )
            for slot, take in rows
        ]
        return mistral.prefill(self.weights, self.cache, chunks)

    def _first_tokens(self, slots: list[Slot], logits: torch.Tensor) -> None:
        """These prompts are in: set up their slots' `seen` rows and sample every first token
        from the prompts' last logits [N, V], in one go (one sampler run, not one per prompt)."""
        device, count = self.device, len(slots)
        index = torch.tensor([slot.index for slot in slots], device=device)
        prompt_rows = torch.repeat_interleave(
            torch.arange(count, device=device),
            torch.tensor([slot.prompt_len for slot in slots], device=device),
        )
        prompt_ids = torch.tensor([t for slot in slots for t in slot.handle.prompt_ids], device=device)
        seen = torch.zeros(count, self.weights.shape.vocab, dtype=torch.bool, device=device)
        seen[prompt_rows, prompt_ids] = True
        counters = torch.tensor([slot.prompt_len - 1 for slot in slots], device=device)
        params = self.buffers.sampling_rows(index)
        shortcuts = eager_shortcuts([slot.handle.params for slot in slots])
        tokens = sample_next_tokens(logits, params, seen, self.buffers.seeds[index], counters, *shortcuts)
        seen[torch.arange(count, device=device), tokens.clamp(min=0)] = True  # NON_FINITE: ends anyway
        self.buffers.seen[index] = seen
        for slot, token in zip(slots, tokens.tolist()):
            self._accept(slot, token)

    # -- decode --
    def _decode(self) -> None:
        rows = [s for s in self._slots if s is not None and s.decoding]
        if not rows:
            return
        batch = max(s.index for s in rows) + 1
        if self.pad_batches:
            batch = decode_step.batch_bucket(batch, self.batch_sizes)
        try:
            tokens = self._run_decode_step(batch)
        except Exception as exc:  # every request in the step
            self._fail(rows, exc)
            return
        for slot in rows:
            self._accept(slot, tokens[slot.index])

    def _run_decode_step(self, batch: int) -> list[int]:
        """Fill rows [0, batch) of the input buffers, run the step, read the sampled tokens back."""
        tokens, positions = [0] * batch, [0] * batch
        for index in range(batch):
            slot = self._slots[index]
            if slot is not None:
                positions[index] = slot.next_position
                tokens[index] = slot.last_token if slot.decoding else 0
        kv_len = kv_cache.kv_bucket(max(positions) + 1, self.cache_len)
        self.buffers.tokens[:batch].copy_(torch.tensor(tokens))
        self.buffers.positions[:batch].copy_(torch.tensor(positions))
        if self.graphs is not None:
            self.graphs.replay(batch, kv_len)
        else:
            decoding = [s.handle.params for s in self._slots[:batch] if s is not None and s.decoding]
            self.eager_step(batch, kv_len, *eager_shortcuts(decoding))
        return self.buffers.next[:batch].tolist()  # the one host sync per step

    def eager_step(self, batch: int, kv_len: int, all_greedy: bool, top_k_bound: int | None) -> None:
        """The eager decode step (CPU, or CUDA without graphs); tests patch this to inject faults."""
        decode_step.decode_and_sample(
            self.weights, self.cache, self.buffers, batch, kv_len, all_greedy, top_k_bound
        )

    def _accept(self, slot: Slot, token: int) -> None:
        """Stream a sampled token, or finish the request on a stop token or its token limit."""
        slot.generated += 1
        slot.last_token = token
        if token == NON_FINITE:
            self.non_finite_replies += 1
            log.error("request %s: the model's logits stopped being finite numbers", slot.handle.id)
            self._release(slot, "error", NON_FINITE_MESSAGE)
            return
        if token in self.stop_ids:
            self._release(slot, "stop")
            return
        slot.handle.deliver(TokenEvent(token=token))
        if slot.generated == slot.handle.params.max_new_tokens:
            self._release(slot, "length")


def is_fatal_device_error(exc: BaseException) -> bool:
    """A device-side assert or illegal address poisons the CUDA context for the whole process;
    only running out of memory is a failure of the one step."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))


def eager_shortcuts(params: list[SamplingParams]) -> tuple[bool, int | None]:
    """What the host knows about a step's rows that lets an eager step skip work: whether all
    are greedy, and a top-k bound when every sampling row has one (rank K, not the vocabulary).
    Rows not listed (idle ones) may come out wrong; their tokens are never read."""
    sampling = [p for p in params if not p.greedy]
    bound = max((p.top_k for p in sampling), default=1) if all(p.top_k > 0 for p in sampling) else None
    return not sampling, bound
