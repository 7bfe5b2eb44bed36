"""What passes between callers and an engine: a request handle streaming token events.

The engine knows token ids only. A caller submits prompt ids with `SamplingParams` and gets a
`RequestHandle`; it iterates the handle (sync or async) for `TokenEvent`s and may `cancel()` it
at any time. Errors come back as a final event, never as an exception on the engine's thread.
`batched.BatchedEngine` and `reference.ReferenceEngine` implement `Engine`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from ..params import SamplingParams

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "cancelled", "error"]
# Why a request ended whose logits stopped being numbers (fp16 overflow with real weights can do it).
NON_FINITE_MESSAGE = (
    "the model's numbers overflowed while writing this reply (its next-token scores were not "
    "finite), so it was stopped rather than shown as nonsense; try again, or lower the temperature"
)


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability, with the likeliest alternatives (as many as the request asked)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), likeliest first


@dataclass(frozen=True)
class TokenEvent:
    token: int | None = None  # a generated token; stop tokens are never sent
    finish_reason: FinishReason | None = None  # set on the last event only
    error: str | None = None  # why, when finish_reason == "error"
    logits: torch.Tensor | None = None  # [V] on the CPU: the scores this token was chosen from,
    # for requests submitted with record_logits (the self-check); None otherwise
    logprobs: TokenLogprobs | None = None  # for requests whose params ask for them

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    alive: bool
    active: int  # requests generating now
    queued: int  # requests waiting for a slot
    capacity: int  # requests that can generate at once
    failure: str | None = None  # why the engine thread died, if it did
    non_finite_replies: int = 0  # requests ended because the model's logits were not finite
    # Reusing what earlier requests computed (see engines/prefix_cache.py): "private" (each
    # visitor their own), "shared", "off", or "none" for an engine that keeps nothing.
    prefix_cache: str = "none"
    kept_caches: int = 0  # slots holding an ended request's cache
    prompt_tokens_prefilled: int = 0  # prompt tokens run through the model, since the start
    prompt_tokens_reused: int = 0  # prompt tokens taken from kept caches instead

    @property
    def reused_share(self) -> float | None:
        """The share of all prompt tokens so far taken from kept caches; None before any."""
        total = self.prompt_tokens_prefilled + self.prompt_tokens_reused
        return self.prompt_tokens_reused / total if total else None


class EngineError(RuntimeError):
    """A request ended with an error; the message is meant for the user."""


_request_ids = itertools.count(1)


class RequestHandle:
    """One request's stream of events, filled by the engine thread, read by one caller."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        record_logits: bool = False,
        cache_scope: str | None = None,
    ) -> None:
        self.id = next(_request_ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.record_logits = record_logits
        # Whose kept caches this request may start from and leave its own to (None: nobody's).
        self.cache_scope = cache_scope
        self._events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._done = False  # set by the engine after the final event
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    # -- caller side --
    def cancel(self) -> None:
        """Ask the engine to stop; it finishes the request within one step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._events.get()
            yield event
            if event.finished:
                return

    def collect(self, timeout: float) -> list[TokenEvent]:
        """Every event up to the final one; TimeoutError if the request is not done in time."""
        deadline, events = time.monotonic() + timeout, []
        while not events or not events[-1].finished:
            try:
                events.append(self._events.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise TimeoutError(f"request {self.id} did not finish within {timeout:.0f} s") from None
        return events

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        # Register the loop before the first look at the queue, so an event the engine puts
        # after that look always wakes us (see `deliver`).
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                await self._wakeup.wait()
                continue
            yield event
            if event.finished:
                return

    # -- engine side --
    @property
    def done(self) -> bool:
        return self._done

    def deliver(self, event: TokenEvent) -> None:
        assert not self._done, "no events after the final one"
        self._done = event.finished
        self._events.put(event)
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        if not self._done:
            self.deliver(TokenEvent(finish_reason=reason, error=error))


class RequestQueue:
    """The caller side every in-process engine shares: submitted requests wait in order in
    `_pending` (guarded by `_wakeup`, which the engine's thread waits on) until that thread takes
    them; after a failure, or once closing, a request is refused at once with the reason."""

    capacity: int
    _thread: threading.Thread  # the engine's own thread

    def __init__(self) -> None:
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._wakeup = threading.Condition()
        self._closing = False
        self.failure: str | None = None
        self.non_finite_replies = 0  # requests ended because their logits were not finite

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        record_logits: bool = False,
        cache_scope: str | None = None,
    ) -> RequestHandle:
        """Queue a request. `cache_scope` names who sent it (a visitor): an engine that keeps
        caches lets it start from what that scope's earlier requests computed, and no other's."""
        handle = RequestHandle(list(prompt_ids), params, record_logits, cache_scope)
        with self._wakeup:
            if self.failure or self._closing:
                handle.finish("error", self.failure or "the engine is shutting down")
                return handle
            self._pending.append(handle)
            self._wakeup.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._wakeup:
            queued = sum(not h.cancelled for h in self._pending)
            active = self._count_active()
        return EngineStats(
            alive=self._thread.is_alive(),
            active=active,
            queued=queued,
            capacity=self.capacity,
            failure=self.failure,
            non_finite_replies=self.non_finite_replies,
            **self._cache_stats(),
        )

    def _count_active(self) -> int:
        """Requests generating now (called with `_wakeup` held)."""
        raise NotImplementedError

    def _cache_stats(self) -> dict[str, object]:
        """The `EngineStats` fields about kept caches (an engine that keeps none: the defaults)."""
        return {}


class Engine(Protocol):
    context_length: int
    capacity: int  # requests that generate at once; more wait in the engine's queue
    device: torch.device
    attention: str  # the attention kernel, as the log and /healthz name it

    def wait_ready(self, timeout: float | None = None) -> bool: ...

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        record_logits: bool = False,
        cache_scope: str | None = None,
    ) -> RequestHandle: ...

    def position(self, handle: RequestHandle) -> int: ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


def describe_failure(exc: BaseException) -> str:
    """A sentence for the user; the stack trace goes to the log."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "the GPU ran out of memory for this request; try a shorter conversation or fewer new tokens"
    return f"generation failed ({type(exc).__name__}: {exc})"
