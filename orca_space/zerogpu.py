"""Hosting on ZeroGPU: a GPU only for the length of one reply, in a worker process of its own.

On ZeroGPU the main process never has a real CUDA device: the `spaces` package fakes one, the
weights are moved to `cuda` on the main thread before `launch()` (and packed then), and each call
of a `@spaces.GPU` function runs in a forked worker that gets a GPU for the `duration` it asks
for, counted against the visitor's daily quota. Nothing is batched across users, graphs and
`torch.compile` do not survive a worker, so each reply runs the reference engine's
`generate_tokens` (transformers' `generate`) inside one small generator: `gpu_reply` below.

This is the only module that touches `spaces`. Three of its rules shape it (read from spaces
0.51.3, see "Deploying on ZeroGPU" in docs/deploying.md):
- the GPU function is a plain (sync) generator whose items are pickled: it yields token ids,
  then ("finish", reason) or ("error", sentence), never tensors;
- closing it takes effect at the worker's next item, and a thread started in the worker is not
  stopped by that: the generator's `finally` stops `generate` through its cancel flag and joins;
- the visitor's quota token is read from gradio's request context, so the generator is
  advanced in threads that carry that context (as `asyncio.to_thread` does), never from a
  thread of our own without it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from .chat import Notify, prompt_and_detokenizer
from .chatml import ChatEncoder
from .engines.device import is_fatal_device_error
from .engines.reference import NonFiniteScores, generate_tokens
from .engines.requests import NON_FINITE_MESSAGE, EngineError, EngineStats, TokenEvent
from .history import Message
from .params import SamplingParams
from .replies import ReplyDelta

log = logging.getLogger(__name__)

# The rate the reply's GPU time is planned at. `generate` with a streamer decoded 11-14 tok/s on
# an H100 (shared/GPU_NOTES.md, the usual Space's path with sampling on), launch-bound, so the
# faster GPUs behind ZeroGPU are not expected to do much better; 10 tok/s leaves room.
ASSUMED_DECODE_TOK_S = 10.0
ASSUMED_PREFILL_TOK_S = 2000.0  # a prompt is one forward: thousands of tokens a second
# A cold worker first streams the 14.5 GB of packed weights to its GPU: seconds, charged too.
COLD_START_MARGIN_S = 15.0
MAX_DURATION_S = 120  # more is refused for visitors without PRO ("illegal duration")
CONCURRENCY = 8  # replies at once: each gets a GPU of its own from ZeroGPU, which may queue them


def reply_duration(prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int]) -> int:
    """GPU seconds to ask for: the prompt, the reply at the assumed rate, a cold start; capped.
    Called by `spaces` with the GPU function's own arguments."""
    needed = COLD_START_MARGIN_S + len(prompt_ids) / ASSUMED_PREFILL_TOK_S
    needed += params.max_new_tokens / ASSUMED_DECODE_TOK_S
    return min(MAX_DURATION_S, math.ceil(needed))


def longest_reply_within_quota_call() -> int:
    """The most new tokens one GPU call can hold at the assumed rate (the page says it)."""
    return int((MAX_DURATION_S - COLD_START_MARGIN_S) * ASSUMED_DECODE_TOK_S)


def spaces_gpu() -> Callable:
    """`spaces.GPU`: on ZeroGPU the real decorator, elsewhere one that returns the function as is."""
    import spaces

    return spaces.GPU


def make_gpu_reply(model, gpu: Callable) -> Callable[..., Iterator]:
    """The one function that runs on a GPU, decorated with `gpu` (`spaces.GPU`, or a stand-in)."""

    def gpu_reply(prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int]) -> Iterator:
        events: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        def run() -> None:
            try:
                events.put(
                    ("finish", generate_tokens(model, prompt_ids, params, stop_ids, events.put, stop.is_set))
                )
            except NonFiniteScores:
                events.put(("error", NON_FINITE_MESSAGE))
            except Exception as exc:  # the sentence travels; the trace stays in this worker's log
                log.exception("generate failed on the GPU worker")
                events.put(("fatal" if is_fatal_device_error(exc) else "error", worker_failure(exc)))

        thread = threading.Thread(target=run, name="orca-zerogpu-generate", daemon=True)
        thread.start()
        try:
            while True:
                item = events.get()
                if isinstance(item, TokenEvent):
                    yield item.token
                elif item[0] == "fatal":
                    # Raised, not yielded: ZeroGPU reuses a worker that ended well, and this one's
                    # CUDA context is gone (a device-side assert poisons the process).
                    raise WorkerPoisoned(item[1])
                else:
                    yield item
                    return
        finally:  # a close (stop, closed tab) or the end: generate must not run on
            stop.set()
            thread.join()

    return gpu(duration=reply_duration)(gpu_reply)


class WorkerPoisoned(RuntimeError):
    """The GPU worker's CUDA context failed for good; ZeroGPU must not reuse this worker."""


def worker_failure(exc: Exception) -> str:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "the GPU ran out of memory for this request; try a shorter conversation or fewer new tokens"
    return f"generation failed on the GPU ({type(exc).__name__}: {exc})"


class ZeroGPUBackend:
    """A `ChatBackend` whose every reply is one ZeroGPU call (and, for /healthz, an engine)."""

    continues_replies = True  # the prompt ends inside the reply; the worker just sees a longer one

    def __init__(
        self, gpu_reply: Callable[..., Iterator], encoder: ChatEncoder, tokenizer, capacity: int
    ) -> None:
        self.gpu_reply = gpu_reply
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.stop_ids = encoder.controls.stop_ids
        self.capacity = capacity
        self.attention = "transformers sdpa, in a ZeroGPU worker"
        self._active = 0

    def stats(self) -> EngineStats:
        # prefix_cache "none": each reply's worker process ends with its call, and its cache too.
        return EngineStats(alive=True, active=self._active, queued=0, capacity=self.capacity)

    def close(self) -> None:
        """Nothing to release: each reply's worker ends with its call."""

    async def stream_reply(
        self,
        messages: list[Message],
        params: SamplingParams,
        notify: Notify | None = None,
        cache_scope: str | None = None,  # unused: a worker keeps nothing between calls
    ) -> AsyncIterator[ReplyDelta]:
        prompt_ids, detokenizer = await prompt_and_detokenizer(self.encoder, self.tokenizer, messages)
        stream = self.gpu_reply(prompt_ids, params, self.stop_ids)
        advancing = threading.Lock()  # held while a thread runs the generator: close waits for it
        self._active += 1
        try:
            while True:
                item = await in_request_context(advance, stream, advancing)
                if isinstance(item, int):
                    yield ReplyDelta(detokenizer.add_token(item), tokens=1)
                    continue
                kind, value = item
                if kind == "error":
                    raise EngineError(value)
                yield ReplyDelta(
                    detokenizer.finalize(), finish_reason=value if value in ("stop", "length") else "stop"
                )
                return
        except EngineError:
            raise
        except Exception as exc:  # ZeroGPU's own refusals and failures: one sentence each
            log.warning("ZeroGPU call failed: %s: %s", type(exc).__name__, exc)
            raise EngineError(explain_zerogpu_failure(exc)) from None
        finally:
            self._active -= 1
            # Runs on stop and on a closed tab too; the worker lets go at its next item.
            await asyncio.shield(in_request_context(close_when_idle, stream, advancing))


_END = ("finish", "stop")


def advance(stream: Iterator, lock: threading.Lock) -> object:
    with lock:
        return next(stream, _END)


def close_when_idle(stream: Iterator, lock: threading.Lock) -> None:
    with lock:
        stream.close()


async def in_request_context(function, *args):
    """Run `function` on a worker thread that carries this task's context (gradio's request,
    from which `spaces` reads the visitor's quota token), as `asyncio.to_thread` does."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(context.run, function, *args)
    )


def explain_zerogpu_failure(exc: Exception) -> str:
    """One sentence saying what went wrong on ZeroGPU and what to do (spaces' titles and texts)."""
    title = getattr(exc, "title", None) or ""
    message = str(getattr(exc, "message", "") or exc).strip()
    if title == "ZeroGPU quota exceeded" or title == "ZeroGPU pending credits exceeded":
        wait = (
            message.split("Try again in", 1)[1].split(".")[0].strip() if "Try again in" in message else None
        )
        when = f"it refills in {wait}" if wait else "it refills a day after you first used it"
        return (
            f"Your free GPU time on ZeroGPU is used up for now ({when}): log in to Hugging Face for more "
            "daily time, wait, or ask for fewer new tokens."
        )
    if title == "ZeroGPU illegal duration":
        return "This reply would need more GPU time than ZeroGPU grants one call; ask for fewer new tokens."
    if title in ("ZeroGPU queue timeout", "ZeroGPU client error") or message.startswith(
        "No GPU was available"
    ):
        return "No GPU was free on ZeroGPU just now (the GPUs are shared); try again in a moment."
    if title == "ZeroGPU worker error" and message == "GPU task aborted":
        return (
            "The GPU call ended before the reply was finished (it ran past the GPU time it asked for, "
            "or its worker crashed); ask for fewer new tokens and try again."
        )
    if title == "ZeroGPU worker error" and message == "OutOfMemoryError":
        return "The GPU ran out of memory for this request; try a shorter conversation or fewer new tokens."
    if title == "ZeroGPU worker error" and message == "WorkerPoisoned":
        return "The GPU failed while writing this reply (a CUDA error); try again, on a fresh GPU."
    if title == "ZeroGPU worker error":
        return f"The GPU call failed ({message}); try again in a moment."
    if isinstance(exc, queue.Empty):
        return "The GPU worker stopped answering; try again in a moment."
    if "ZeroGPU API" in message:
        return "ZeroGPU could not schedule a GPU just now; try again in a moment."
    return f"The GPU call failed ({type(exc).__name__}); try again in a moment."
