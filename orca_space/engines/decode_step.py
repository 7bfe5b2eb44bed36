"""The decode step the engine replays: static buffers in, sampled tokens out.

One step is the forward for every decoding slot and each row's own sampling, with no host sync,
so on CUDA it is captured once per (batch, key-length) bucket as a CUDA graph and replayed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..params import MAX_TOP_LOGPROBS, SamplingParams
from . import capture, fused_decode
from .hf_weights import MistralWeights
from .kv_cache import KVCache
from .mistral import decode
from .sampling import LogprobRows, SamplingTensors, sample_next_tokens
from .step_options import BASELINE, StepOptions


@dataclass(frozen=True)
class DecodeBuffers:
    """One row per slot. The engine writes the inputs; the step reads rows [:B] and writes `next`.

    Fixed addresses are what lets a CUDA graph captured once be replayed with new values.
    """

    tokens: torch.Tensor  # long [S]: each slot's last token, fed this step
    positions: torch.Tensor  # long [S]: where that token goes in the slot's cache
    seeds: torch.Tensor  # long [S]: each request's sampling seed (see sample_next_tokens)
    sampling: SamplingTensors  # [S, 1] each
    seen: torch.Tensor  # bool [S, V]: tokens in each request's prompt or reply so far
    counts: torch.Tensor  # float [S, V]: how often each token is in each request's reply so far
    next: torch.Tensor  # long [S]: the step's sampled tokens
    logits: torch.Tensor  # [S, V] in the model dtype: the step's logits, when kept (see below)
    logprobs: LogprobRows  # the step's log-probabilities, when kept (for requests that ask)
    allowed: torch.Tensor  # int32 [S, ceil(V/32)]: each row's allowed tokens, a bit each (token_masks.py)

    @classmethod
    def allocate(cls, slots: int, vocab: int, device, logits_dtype=torch.float32) -> DecodeBuffers:
        def column(dtype, fill=0.0):
            return torch.full((slots, 1), fill, dtype=dtype, device=device)

        longs = lambda: torch.zeros(slots, dtype=torch.long, device=device)  # noqa: E731
        return cls(
            tokens=longs(),
            positions=longs(),
            seeds=longs(),
            sampling=SamplingTensors(
                temperature=column(torch.float32),
                top_p=column(torch.float32, 1.0),
                top_k=column(torch.long),
                repetition_penalty=column(torch.float32, 1.0),
                min_p=column(torch.float32),
                presence_penalty=column(torch.float32),
                frequency_penalty=column(torch.float32),
            ),
            seen=torch.zeros(slots, vocab, dtype=torch.bool, device=device),
            counts=torch.zeros(slots, vocab, dtype=torch.float32, device=device),
            next=longs(),
            logits=torch.zeros(slots, vocab, dtype=logits_dtype, device=device),
            logprobs=LogprobRows.allocate(slots, min(MAX_TOP_LOGPROBS, vocab), device),
            allowed=torch.full((slots, (vocab + 31) // 32), -1, dtype=torch.int32, device=device),
        )

    def rows(self, batch: int) -> tuple[torch.Tensor, ...]:
        return self.tokens[:batch], self.positions[:batch], self.seeds[:batch], self.seen[:batch]

    def set_request(self, index: int, params: SamplingParams) -> None:
        """Write a request's sampling parameters and seed into its slot's row."""
        s = self.sampling
        s.temperature[index] = params.temperature
        s.top_p[index] = params.top_p
        s.top_k[index] = params.top_k
        s.repetition_penalty[index] = params.repetition_penalty
        s.min_p[index] = params.min_p
        s.presence_penalty[index] = params.presence_penalty
        s.frequency_penalty[index] = params.frequency_penalty
        seed = params.seed if params.seed is not None else random.randrange(2**32)
        self.seeds[index] = (seed ^ (seed >> 32)) & 0xFFFFFFFF

    def move_row(self, source: int, target: int) -> None:
        """A request moves from slot `source` to `target`: its seed, sampling parameters and
        `seen` and `counts` rows go with it (inputs and outputs are written afresh every step)."""
        s = self.sampling
        columns = (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.min_p)
        for tensor in (self.seeds, self.seen, self.counts, *columns, s.presence_penalty, s.frequency_penalty):
            tensor[target] = tensor[source]

    def sampling_rows(self, rows: slice | torch.Tensor) -> SamplingTensors:
        s = self.sampling  # spelled out: torch.compile traces this inside the step
        return SamplingTensors(
            s.temperature[rows],
            s.top_p[rows],
            s.top_k[rows],
            s.repetition_penalty[rows],
            s.min_p[rows],
            s.presence_penalty[rows],
            s.frequency_penalty[rows],
        )


def decode_and_sample(
    weights: MistralWeights,
    cache: KVCache,
    buffers: DecodeBuffers,
    batch: int,
    kv_len: int,
    all_greedy: bool = False,
    top_k_bound: int | None = None,
    keep_logits: bool = False,
    keep_logprobs: bool = False,
    apply_mask: bool = True,
    options: StepOptions = BASELINE,
) -> None:
    """The whole decode step for slots [0, batch): forward, per-row sampling, `seen` update.

    No host sync anywhere, so on CUDA it is captured once per (batch, kv_len) and replayed
    (with the defaults: the eager shortcuts `all_greedy` and `top_k_bound` depend on the rows).
    The sampler's counter is the input position: unique per token of a request. `keep_logits`
    copies the logits into `buffers.logits` for requests that record them (the self-check):
    captured graphs always keep them (one [B, V] copy, microseconds against a step of
    milliseconds); an eager step only when asked. `keep_logprobs` likewise writes each row's
    log-probabilities into `buffers.logprobs` (see `sample_next_tokens`). `apply_mask` applies
    `buffers.allowed` (the grammars of constrained rows): graphs always do; an eager step only
    when a row is constrained. `options` picks the forward: today's (`mistral.decode`) or the
    fused one (`fused_decode.decode`), see `step_options.py`.
    """
    tokens, positions, _, _ = buffers.rows(batch)
    if options.is_baseline:
        logits = decode(weights, cache, tokens, positions, kv_len)  # [B, V]
    else:
        logits = fused_decode.decode(weights, cache, tokens, positions, kv_len, options)
    sample_decoded(buffers, logits, batch, all_greedy, top_k_bound, keep_logits, keep_logprobs, apply_mask)


def sample_decoded(
    buffers: DecodeBuffers,
    logits: torch.Tensor,
    batch: int,
    all_greedy: bool = False,
    top_k_bound: int | None = None,
    keep_logits: bool = False,
    keep_logprobs: bool = False,
    apply_mask: bool = True,
) -> None:
    """Sampling for slots [0, batch) from their decode logits [B, V] (see `decode_and_sample`;
    also a mixed step's decode rows, `packed.py`): the tokens go to `buffers.next`, and each
    row's `seen` and `counts` take its token."""
    _, positions, seeds, seen = buffers.rows(batch)
    if keep_logits:
        buffers.logits[:batch].copy_(logits)
    params = buffers.sampling_rows(slice(0, batch))
    counts = buffers.counts[:batch]
    logprobs = buffers.logprobs.head(batch) if keep_logprobs else None
    allowed = buffers.allowed[:batch] if apply_mask else None
    chosen = sample_next_tokens(
        logits, params, seen, seeds, positions, all_greedy, top_k_bound, counts, logprobs, allowed
    )  # [B]
    column = chosen.clamp(min=0)[:, None]  # a NON_FINITE row's request ends anyway
    # A row riding along (position -1) may be a live request decoding in the step's other launch
    # (key_groups.py): its `seen` and `counts` stay as they were.
    live = positions[:, None] >= 0  # [B, 1]
    seen.scatter_(1, column, seen.gather(1, column) | live)
    counts.scatter_add_(1, column, live.to(counts.dtype))
    buffers.next[:batch].copy_(chosen)


def sample_first_tokens(
    buffers: DecodeBuffers,
    logits: torch.Tensor,
    slots: list[int],
    prompts: list[list[int]],
    shortcuts: tuple[bool, int | None],
    to_device,
    keep_logprobs: bool = False,
    allowed: torch.Tensor | None = None,
) -> tuple[list[int], LogprobRows | None]:
    """Prompts just prefilled into `slots`: set up their `seen` rows and sample every first
    token from the prompts' last logits [N, V] in one go (one sampler run, not one per prompt).
    Every index is built on the host and sent in one copy (`to_device`, the engine's staging):
    nothing here waits for the device until the tokens are read back. With `keep_logprobs`, the
    first tokens' log-probabilities come back too (on the device). `allowed` [N, W]: the
    constrained prompts' first-token masks (`token_masks.TokenMasks.first_masks`), or None."""
    count = len(slots)
    index, prompt_rows, prompt_ids, counters, rows = to_device(
        [
            slots,
            [row for row, prompt in enumerate(prompts) for _ in prompt],
            [token for prompt in prompts for token in prompt],
            [len(prompt) - 1 for prompt in prompts],
            list(range(count)),
        ]
    )
    seen = torch.zeros(count, buffers.seen.shape[1], dtype=torch.bool, device=buffers.seen.device)
    seen[prompt_rows, prompt_ids] = True
    counts = torch.zeros(seen.shape, dtype=buffers.counts.dtype, device=seen.device)  # no reply yet
    params = buffers.sampling_rows(index)
    logprobs = None
    if keep_logprobs:
        logprobs = LogprobRows.allocate(count, buffers.logprobs.top_ids.shape[1], seen.device)
    seeds = buffers.seeds[index]
    tokens = sample_next_tokens(logits, params, seen, seeds, counters, *shortcuts, counts, logprobs, allowed)
    seen[rows, tokens.clamp(min=0)] = True  # NON_FINITE: that request ends anyway
    counts[rows, tokens.clamp(min=0)] = 1.0
    buffers.seen[index] = seen
    buffers.counts[index] = counts
    return tokens.tolist(), logprobs


class DecodeGraphs:
    """`decode_and_sample` captured as one CUDA graph per (batch, kv_len) bucket.

    Capture and replay must happen on the same thread (the engine thread): CUDA-graph state is
    thread-local in PyTorch. Graphs share one memory pool: they never run concurrently and each
    writes its result into `buffers.next` (allocated outside the pool), which makes sharing safe
    in any replay order (pytorch/pytorch#166975; vLLM relies on the same).

    `compile_step` first compiles the step once with symbolic batch and key lengths (Inductor
    fuses the norms, rope and sampler arithmetic), then captures that code per bucket the same
    way. It costs a compile at warm-up (a minute or more for the 7B model).
    """

    def __init__(
        self,
        weights: MistralWeights,
        cache: KVCache,
        buffers: DecodeBuffers,
        compile_step: bool = False,
        options: StepOptions = BASELINE,
    ) -> None:
        self.weights, self.cache, self.buffers, self.options = weights, cache, buffers, options
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        # One side stream for every warm-up: the caching allocator keeps blocks per stream.
        self.warmup_stream = torch.cuda.Stream()
        self.step_fn = (
            torch.compile(decode_and_sample, fullgraph=True, dynamic=True)
            if compile_step
            else decode_and_sample
        )

    def capture(self, batch: int, kv_len: int) -> None:
        """Warm up, prove the step capturable, capture it (see `capture.py` for what a failed
        capture does to the process, and how this leaves it usable)."""

        def step() -> None:
            self.step_fn(
                self.weights,
                self.cache,
                self.buffers,
                batch,
                kv_len,
                keep_logits=True,
                keep_logprobs=True,
                options=self.options,
            )

        side = self.warmup_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs: lazy inits, workspaces, compiles happen outside capture
            step()
            capture.check_capturable(step)  # a host sync fails here, named, before any capture
        torch.cuda.current_stream().wait_stream(side)
        self.graphs[(batch, kv_len)] = capture.capture_graph(step, self.pool, self.weights.device)

    def replay(self, batch: int, kv_len: int) -> None:
        self.graphs[(batch, kv_len)].replay()


def batch_buckets(slots: int, smallest: int = 1) -> list[int]:
    """Batch sizes to capture: powers of two from `smallest`, then steps of 16, up to `slots`
    (always included). A compiled step starts at 2: torch.compile specializes a batch of 1
    (it compiles it separately, a minute more of warm-up for the 7B model), and a second row
    costs a memory-bound step almost nothing."""
    sizes = [size for size in (1, 2, 4, 8, 16) if smallest <= size < slots]
    sizes += list(range(32, slots, 16))
    return sizes + [slots]


def batch_bucket(needed: int, sizes: list[int]) -> int:
    """The smallest of the captured batch `sizes` that holds `needed` rows."""
    return next(size for size in sizes if size >= needed)
