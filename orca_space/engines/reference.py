"""The reference engine: transformers' own `generate` with a streamer, one request at a time.

This is the path every other Space runs: slow (each token is an eager forward, nothing is
batched), but it has run on every GPU there is, which is why it is the ladder's last rung. It
serves one request at a time on its own thread; the others wait in order and are told their
place. A stop or a closed tab cancels the request within one token (a stopping criterion reads
the handle's flag at every step).

`generate_tokens` is the whole of one request, with callbacks, so that it can also run where a
GPU exists only for the duration of one call (ZeroGPU's worker processes).
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable

import torch

from ..params import SamplingParams
from .device import is_fatal_device_error, release_cached_memory
from .requests import (
    NON_FINITE_MESSAGE,
    FinishReason,
    RequestHandle,
    RequestQueue,
    TokenEvent,
    describe_failure,
)

log = logging.getLogger(__name__)


class NonFiniteScores(RuntimeError):
    """The model's scores for the next token held NaN or +inf."""


def generation_config_for(base, params: SamplingParams, stop_ids: Iterable[int]):
    """The model's own generation config with this request's settings: greedy at temperature 0,
    else sampling with temperature, top-p and top-k (0 = off); the repetition penalty either way;
    and every stop id as an end of sequence."""
    config = copy.deepcopy(base)
    config.max_new_tokens = params.max_new_tokens
    config.max_length = None
    config.repetition_penalty = params.repetition_penalty
    config.eos_token_id = [] if params.ignore_eos else sorted(stop_ids)
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id[0] if config.eos_token_id else 0
    config.do_sample = not params.greedy
    if params.greedy:
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50  # transformers' defaults: unused
    else:
        config.temperature, config.top_p, config.top_k = params.temperature, params.top_p, params.top_k
        config.min_p = params.min_p or None
    if params.presence_penalty or params.frequency_penalty:  # `generate` has no such processor
        raise ValueError("the reference engine has no presence or frequency penalty; leave them at 0")
    return config


class _StepScores:
    """A logits processor that checks each step's scores are numbers (NaN or +inf would make the
    draw fail, or, on CUDA, a device-side assert that poisons the process) and keeps them when
    the caller records logits. transformers runs custom processors after its own penalties and
    before temperature, top-k and top-p, so without a repetition penalty these are the raw
    logits."""

    def __init__(self, record: bool) -> None:
        self.record = record
        self.latest: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if bool((torch.isnan(scores) | torch.isposinf(scores)).any()):
            raise NonFiniteScores("the next-token scores were not finite")
        if self.record:
            self.latest = scores[0].to("cpu", torch.float32, copy=True)
        return scores


def grammar_mask(params: SamplingParams, prompt_len: int) -> list:
    """The request's grammar as a logits processor (`token_masks.GrammarLogitsProcessor`), if any."""
    if params.constraint is None:
        return []
    from .token_masks import GrammarLogitsProcessor

    return [GrammarLogitsProcessor(params.constraint, prompt_len)]


class _TokenStreamer:
    """What `generate` calls with each new token (its first call is the prompt): the tokens
    become events, stop tokens end the reply unsent."""

    def __init__(self, emit: Callable[[TokenEvent], None], stop_ids: frozenset[int], scores: _StepScores):
        self.emit, self.stop_ids, self.scores = emit, stop_ids, scores
        self.prompt_seen = False
        self.generated = 0
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.generated += 1
            if token in self.stop_ids:
                self.stopped = True
            elif not self.stopped:
                self.emit(TokenEvent(token=token, logits=self.scores.latest))

    def end(self) -> None:
        pass


def generate_tokens(
    model,
    prompt_ids: list[int],
    params: SamplingParams,
    stop_ids: frozenset[int],
    emit: Callable[[TokenEvent], None],
    is_cancelled: Callable[[], bool],
    record_logits: bool = False,
) -> FinishReason:
    """One request through `model.generate`: each token emitted as it comes; returns why it ended."""
    from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            return torch.full(
                (input_ids.shape[0],), is_cancelled(), dtype=torch.bool, device=input_ids.device
            )

    scores = _StepScores(record_logits)
    streamer = _TokenStreamer(emit, stop_ids, scores)
    # One request at a time on this thread: the global generator is ours. An unseeded request
    # after a seeded one must not go on from that seed's known state.
    if params.seed is not None:
        torch.manual_seed(params.seed)
    else:
        torch.seed()
    inputs = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            generation_config=generation_config_for(model.generation_config, params, stop_ids),
            streamer=streamer,
            logits_processor=LogitsProcessorList([scores, *grammar_mask(params, len(prompt_ids))]),
            stopping_criteria=StoppingCriteriaList([Cancelled()]),
        )
    if is_cancelled():
        return "cancelled"
    return "stop" if streamer.stopped or streamer.generated < params.max_new_tokens else "length"


class ReferenceEngine(RequestQueue):
    """`generate` on a thread of its own, one request at a time; see the module docstring."""

    capacity = 1

    def __init__(self, model, stop_ids: Iterable[int], context_length: int) -> None:
        super().__init__()
        self.model = model
        self.device = model.device
        self.stop_ids = frozenset(stop_ids)
        self.context_length = context_length
        self.attention = getattr(model.config, "_attn_implementation", "sdpa")
        self.grammar_vocab = model.config.vocab_size  # grammars apply (token_masks.GrammarLogitsProcessor)
        self._current: RequestHandle | None = None
        started = time.monotonic()
        self._thread = threading.Thread(target=self._serve, name="orca-reference-engine", daemon=True)
        self._thread.start()
        self.ready_s = time.monotonic() - started  # nothing to warm up: generate compiles nothing

    # -- caller side --
    def position(self, handle: RequestHandle) -> int:
        """0 if generating, done or next to start; else the 1-based place in line."""
        with self._wakeup:
            ahead = 1 if self._current is not None else 0
            for index, waiting in enumerate(self._pending):
                if waiting is handle:
                    return index + ahead
        return 0

    def _count_active(self) -> int:
        return int(self._current is not None)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.failure is None and self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        with self._wakeup:
            self._closing = True
            for handle in [*self._pending, *([self._current] if self._current else [])]:
                handle.cancel()
            self._wakeup.notify()
        self._thread.join(timeout)

    # -- engine thread --
    def _serve(self) -> None:
        try:
            while (handle := self._next_request()) is not None:
                self._run(handle)
                with self._wakeup:
                    self._current = None
        except BaseException as exc:  # the thread is dying: say so, fail everyone
            self.failure = f"the engine stopped: {describe_failure(exc)}"
            log.critical(self.failure, exc_info=True)
            with self._wakeup:
                waiting, self._pending = list(self._pending), collections.deque()
            for handle in waiting:
                handle.finish("error", self.failure)
            raise

    def _next_request(self) -> RequestHandle | None:
        with self._wakeup:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self._pending.popleft().finish("cancelled")
                if self._closing:
                    for handle in self._pending:
                        handle.finish("cancelled")
                    self._pending.clear()
                    return None
                if self._pending:
                    self._current = self._pending.popleft()
                    return self._current
                self._wakeup.wait()

    def _run(self, handle: RequestHandle) -> None:
        prompt_len, new = len(handle.prompt_ids), handle.params.max_new_tokens
        if prompt_len == 0 or prompt_len + new > self.context_length:
            handle.finish(
                "error",
                f"prompt of {prompt_len} tokens plus {new} new tokens does not fit the context of "
                f"{self.context_length}",
            )
            return
        try:
            reason = generate_tokens(
                self.model,
                handle.prompt_ids,
                handle.params,
                self.stop_ids,
                handle.deliver,
                lambda: handle.cancelled,
                handle.record_logits,
            )
        except NonFiniteScores:
            self.non_finite_replies += 1
            log.error("request %s: the model's logits stopped being finite numbers", handle.id)
            handle.finish("error", NON_FINITE_MESSAGE)
        except Exception as exc:  # this request only; the next one may well work
            if is_fatal_device_error(exc):
                handle.finish("error", describe_failure(exc))
                raise  # the CUDA context is gone for everyone: `_serve` fails the rest
            log.error("generate failed for request %s", handle.id, exc_info=exc)
            handle.finish("error", describe_failure(exc))
            release_cached_memory(self.device)
        else:
            handle.finish(reason)
