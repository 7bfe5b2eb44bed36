"""The in-process engine: one thread owns the model and serves requests from a queue.

Why one thread: the model's state (and, on CUDA, captured graphs, which are thread-local)
belongs to whoever runs it, and one owner makes cancels and errors simple. Callers never touch
the model; they submit prompt ids and read a `RequestHandle` (see `requests.py`). This engine
serves one request at a time with transformers' `DynamicCache`; a batched engine can replace
it behind the same `Engine` interface.

The decode loop is a chain of small steps in the spirit of gpt-fast: `prefill` fills the
cache and returns the last logits, `decode_one_token` feeds one token, and `sample_next_tokens`
picks the next token on the device.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Iterable

import torch

from .params import SamplingParams
from .requests import EngineStats, RequestHandle, TokenEvent
from .sampling import SamplingTensors, sample_next_tokens

log = logging.getLogger(__name__)


@torch.inference_mode()
def prefill(model, prompt_ids: torch.Tensor, cache) -> torch.Tensor:
    """prompt_ids: [1, T]. Fills `cache`; returns the last position's logits [1, V]."""
    out = model(input_ids=prompt_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


@torch.inference_mode()
def decode_one_token(model, token: torch.Tensor, cache) -> torch.Tensor:
    """token: [1, 1]. Appends it to `cache`; returns logits for the next position [1, V]."""
    out = model(input_ids=token, cache=cache, use_cache=True)
    return out.logits[:, -1, :]


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def seeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.randrange(2**62))
    return generator


class LocalEngine:
    """Runs `model` on a dedicated thread, one request at a time, FIFO."""

    capacity = 1

    def __init__(self, model, stop_ids: Iterable[int], context_length: int) -> None:
        self.model = model
        self.stop_ids = frozenset(stop_ids)
        self.context_length = context_length
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._wakeup = threading.Condition()
        self._active: RequestHandle | None = None
        self._closing = False
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._serve, name="orca-engine", daemon=True)
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
        """0 while generating or done, else the 1-based place among waiting requests."""
        with self._wakeup:
            for place, waiting in enumerate(self._pending, start=1):
                if waiting is handle:
                    return place
        return 0

    def stats(self) -> EngineStats:
        with self._wakeup:
            queued = sum(not h.cancelled for h in self._pending)
        return EngineStats(
            alive=self._thread.is_alive(),
            active=int(self._active is not None),
            queued=queued,
            capacity=self.capacity,
            failure=self.failure,
        )

    def close(self, timeout: float = 10.0) -> None:
        with self._wakeup:
            self._closing = True
            for handle in self._pending:
                handle.cancel()
            self._wakeup.notify()
        if self._active is not None:
            self._active.cancel()
        self._thread.join(timeout)

    # -- engine thread --
    def _next_request(self) -> RequestHandle | None:
        with self._wakeup:
            while not self._pending and not self._closing:
                self._wakeup.wait()
            if not self._pending:
                return None
            self._active = self._pending.popleft()
            return self._active

    def _serve(self) -> None:
        try:
            while (handle := self._next_request()) is not None:
                try:
                    self._generate(handle)
                except Exception as exc:  # a request's failure must not end the engine
                    log.exception("request %d failed", handle.id)
                    handle.finish("error", describe_failure(exc))
                finally:
                    self._release()
        except BaseException as exc:  # the thread itself is dying: say so, fail everyone
            self.failure = f"the engine stopped: {describe_failure(exc)}"
            log.critical(self.failure, exc_info=True)
            self._fail_pending(self.failure)
            raise

    def _release(self) -> None:
        with self._wakeup:
            self._active = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # after an OOM, hand the fragments back

    def _fail_pending(self, reason: str) -> None:
        with self._wakeup:
            waiting, self._pending = list(self._pending), collections.deque()
            active = self._active
        for handle in [*waiting, *([active] if active else [])]:
            handle.finish("error", reason)

    def _generate(self, handle: RequestHandle) -> None:
        params = handle.params
        prompt_len = len(handle.prompt_ids)
        if prompt_len == 0 or prompt_len + params.max_new_tokens > self.context_length:
            handle.finish(
                "error",
                f"prompt of {prompt_len} tokens plus {params.max_new_tokens} new tokens "
                f"does not fit the context of {self.context_length}",
            )
            return
        if handle.cancelled:
            handle.finish("cancelled")
            return
        # 1) prefill the prompt
        prompt = torch.tensor([handle.prompt_ids], dtype=torch.long, device=self.device)
        cache = new_cache(self.model)
        logits = prefill(self.model, prompt, cache)
        seen = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=self.device)
        seen[0, prompt[0]] = True
        sampling = SamplingTensors.from_params([params], self.device)
        generator = seeded_generator(self.device, params.seed)
        # 2) decode until a stop token, the token limit, or a cancel
        for step in range(params.max_new_tokens):
            if handle.cancelled:
                handle.finish("cancelled")
                return
            token = sample_next_tokens(logits, sampling, seen, generator)
            token_id = int(token[0])
            if token_id in self.stop_ids:
                handle.finish("stop")
                return
            handle.deliver(TokenEvent(token=token_id))
            if step + 1 == params.max_new_tokens:
                break
            seen[0, token_id] = True
            logits = decode_one_token(self.model, token.view(1, 1), cache)
        handle.finish("length")


def describe_failure(exc: BaseException) -> str:
    """A sentence for the user; the stack trace goes to the log."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "the GPU ran out of memory for this request; try a shorter conversation or fewer new tokens"
    return f"generation failed ({type(exc).__name__}: {exc})"


def wait_until_idle(engine, timeout: float = 5.0) -> bool:
    """For tests and health checks: True once nothing is generating or queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.active == 0 and stats.queued == 0:
            return True
        time.sleep(0.02)
    return False
