"""What gradio's sessions may keep in the server's memory, and for how long.

gradio 6.31 keeps, for each session (a `session_hash`, which any client makes up), the last value
of every component an event read or wrote (`SessionState.config_values`) and of every `gr.State`
an event wrote (`state_data`), for up to 10,000 sessions (`state_session_capacity`), for as long
as the process lives (a State's `time_to_live` drops the State's value only, not the components').
Each event takes whatever it is sent: 9 forged sessions, each sent one 4 MB history of 62,902
tiny messages, took the server from 629 to 1,216 MB (issue #27); 230 would take a 15 GB Space down.

`SessionBounds` puts limits on that, around the two places gradio stores a session's values
(instance overrides of `Blocks.process_api` and `Blocks.postprocess_data`; the test in
tests/test_session_bounds.py fails if a gradio upgrade moves them):

1. before anything is stored, each value an event brings in (its inputs) or leaves (its outputs;
   of a streamed reply, its first update: the later ones grow it by one reply at most) is
   measured (`stored_size`: Python's own size of every object in it). A list longer than
   `max_list_items` (a history of more messages than a chat can hold, notes included) or a session
   over `max_session_bytes` is refused, in words, and nothing of it is kept;
2. new sessions are rate limited per address, in a limiter of their own at
   `SESSIONS_PER_MESSAGE` times the chat's rate limit (a person opens a tab or two a minute and
   a classroom behind one address a few dozen; a script forging sessions opens thousands);
3. after the event, all sessions together stay under `max_total_bytes` (each also counting what a
   bare session costs gradio), the least recently used going first, and a session unused for
   `idle_s` is dropped. gradio's own cap, `MAX_SESSIONS`, is passed at launch.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import logging
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import gradio as gr
from gradio.blocks import Block

from ..chat import MAX_HISTORY_MESSAGES
from ..ratelimit import RateLimiter, client_key
from ..runtime import ChatRuntime
from .refusals import refusal

log = logging.getLogger(__name__)
# New sessions a minute per address, for each chat message the rate limit allows: a page load,
# a reload and every gradio_client or link reader is a session, and many people may share an
# address (a classroom, an office), while forging sessions to crowd others out takes thousands.
SESSIONS_PER_MESSAGE = 4
# Whether gradio is running an event's first step (not a streamed update), for postprocess_data.
FIRST_STEP: contextvars.ContextVar[bool] = contextvars.ContextVar("first_step", default=False)
MAX_SESSIONS = 2_000  # gradio's state_session_capacity (its default is 10,000)


@dataclass(frozen=True)
class SessionLimits:
    # A shown chat holds each message and a note under each reply: at most 1.5 entries a message.
    max_list_items: int = 2 * MAX_HISTORY_MESSAGES
    # A 1 MB conversation (an import's limit) shown, in the history states, saved and being
    # imported is about 12 MB of Python objects; a session never needs more than this.
    max_session_bytes: int = 24 << 20
    max_total_bytes: int = 160 << 20  # every session together (--session-memory-mb)
    idle_s: float = 6 * 3600  # a session unused this long is dropped


class TooLarge(ValueError):
    pass


def stored_size(value: Any, max_list_items: int, max_bytes: int) -> int:
    """Bytes of Python objects in `value` (every object counted where it appears), or TooLarge
    naming the first limit it passes: a list longer than `max_list_items`, or over `max_bytes`
    (where the walk stops: a refused value is not walked to its end)."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        total += sys.getsizeof(item)
        if total > max_bytes:
            raise TooLarge(f"more than {max_bytes / (1 << 20):.0f} MB")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            if len(item) > max_list_items:
                raise TooLarge(f"a list of {len(item):,} messages or items; the limit is {max_list_items:,}")
            stack.extend(item)
        elif isinstance(item, Block):  # an update (gr.Textbox(value=...)): gradio keeps its arguments
            stack.append(getattr(item, "constructor_args", {}))
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(vars(item).values())
    return total


class SessionBounds:
    """See the module docstring. `bound(page)` installs it on a page before launch."""

    def __init__(
        self,
        runtime: ChatRuntime,
        limits: SessionLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.limits = limits
        self.clock = clock
        limiter = runtime.limiter
        self.new_sessions = (
            None
            if limiter is None
            else RateLimiter(limiter.limit * SESSIONS_PER_MESSAGE, limiter.window, clock)
        )
        # Per session (gradio's SessionState, dropped with it): bytes kept per block id.
        self.sizes: weakref.WeakKeyDictionary[Any, dict[int, int]] = weakref.WeakKeyDictionary()
        self.last_used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self.kept_bytes = 0  # the sum of `sizes`, kept as they change
        self.bare_session_bytes = 0  # measured on the first event
        self.dropped = 0  # sessions dropped here, idle or over the budget
        self.page: gr.Blocks | None = None

    def bound(self, page: gr.Blocks) -> None:
        for name in ("process_api", "postprocess_data"):
            if not hasattr(page, name):
                raise RuntimeError(f"gr.Blocks.{name} is gone (a gradio upgrade?): update session_bounds.py")
        self.page = page
        process_api, postprocess_data = page.process_api, page.postprocess_data
        signature = inspect.signature(process_api)

        async def bounded_process_api(*args, **kwargs):
            call = signature.bind(*args, **kwargs).arguments
            state = call.get("state")
            block_fn = call["block_fn"]
            block_fn = page.fns[block_fn] if isinstance(block_fn, int) else block_fn
            if state is not None and call.get("iterator") is None and not block_fn.batch:  # a first step
                self.admit(state, call.get("request"))
                self.check(state, block_fn.inputs, call["inputs"], inputs=True)
                first_step = FIRST_STEP.set(True)
                try:
                    return await process_api(*args, **kwargs)
                finally:
                    FIRST_STEP.reset(first_step)
                    self.keep_within_budget(state)
            return await process_api(*args, **kwargs)

        async def bounded_postprocess_data(block_fn, predictions, state):
            # A streamed reply's later updates are not measured: each is the first one grown by
            # at most one reply (max new tokens), and measuring a long chat 20 times a second per
            # stream would cost more than gradio's own work; the next event measures it whole.
            if state is not None and not block_fn.batch and FIRST_STEP.get():
                self.check(
                    state, block_fn.outputs, output_values(block_fn.outputs, predictions), inputs=False
                )
            return await postprocess_data(block_fn, predictions, state)

        page.process_api = bounded_process_api
        page.postprocess_data = bounded_postprocess_data

    # -- 1. measured before it is stored --------------------------------------------------------

    def check(self, state, blocks: Iterable, values: Iterable, inputs: bool) -> None:
        """Measure what this step stores in `state` (a State's value; any component's, as an input
        or an output); refuse it, storing nothing, if it passes a limit."""
        limits = self.limits
        kept = dict(self.sizes.get(state, {}))
        for block, value in zip(blocks, values, strict=False):
            if inputs and block.stateful:
                continue  # a State's input is what the server holds, not what the client sent
            if isinstance(value, dict) and value.get("__type__") == "update" and "value" not in value:
                continue  # gr.skip() and updates of other properties keep what was there
            others = sum(size for block_id, size in kept.items() if block_id != block._id)
            room = limits.max_session_bytes - others
            try:
                kept[block._id] = stored_size(value, limits.max_list_items, room)
            except TooLarge as exc:
                raise refusal(
                    f"This is more than a chat session can keep ({exc}): start a new chat, or "
                    "export this one and import a shorter part."
                ) from None
        self.kept_bytes += sum(kept.values()) - sum(self.sizes.get(state, {}).values())
        self.sizes[state] = kept

    # -- 2. new sessions, per address -----------------------------------------------------------

    def admit(self, state, request) -> None:
        """Count a session the first time one of its events runs; refuse beyond the chat's rate."""
        now = self.clock()
        first = state not in self.last_used
        self.last_used[state] = now
        if not first or self.new_sessions is None or not isinstance(request, gr.Request):
            return
        peer = request.client.host if request.client else None
        address = client_key(peer, request.headers.get("x-forwarded-for"), self.runtime.trusted_proxy_hops)
        if (wait := self.new_sessions.acquire(address)) > 0:
            del self.last_used[state]
            raise refusal(
                f"Too many new sessions from this address: the limit is {self.new_sessions.limit} a "
                f"minute. Try again in {wait:.0f} s."
            )

    # -- 3. every session together --------------------------------------------------------------

    def keep_within_budget(self, current) -> None:
        """Drop idle sessions, then the least recently used ones while all together are over
        `max_total_bytes` (never `current`, whose event is running)."""
        holder = self.page.state_holder
        now = self.clock()
        with holder.lock:
            idle = []
            for session_hash, state in holder.session_data.items():  # least recently used first
                if now - self.last_used.get(state, now) <= self.limits.idle_s:
                    break
                idle.append(session_hash)
            for session_hash in idle:
                self.drop(holder, session_hash, current)
            if self.estimate(holder) <= self.limits.max_total_bytes:
                return
            # Sessions gradio dropped itself (past MAX_SESSIONS) are still in the running count.
            self.kept_bytes = sum(sum(self.sizes.get(s, {}).values()) for s in holder.session_data.values())
            for session_hash in list(holder.session_data):
                if self.estimate(holder) <= self.limits.max_total_bytes:
                    break
                self.drop(holder, session_hash, current)

    def drop(self, holder, session_hash: str, current) -> None:
        state = holder.session_data[session_hash]
        if state is current:
            return
        del holder.session_data[session_hash]
        holder.time_last_used.pop(session_hash, None)
        self.kept_bytes -= sum(self.sizes.pop(state, {}).values())
        self.dropped += 1

    def estimate(self, holder) -> int:
        """Every session's bytes, as counted here: what each keeps, and a bare session's cost."""
        if not self.bare_session_bytes:
            self.bare_session_bytes = bare_session_bytes(self.page)
        return self.kept_bytes + self.bare_session_bytes * len(holder.session_data)

    def total_bytes(self) -> int:
        """What every session holds now, as counted here (for the tests and the bench)."""
        holder = self.page.state_holder
        with holder.lock:
            return self.estimate(holder)


def bare_session_bytes(page: gr.Blocks) -> int:
    """What gradio keeps for a session before any value: its copy of every component's config."""
    from gradio.state_holder import SessionState

    return stored_size(SessionState(page).config_values, sys.maxsize, sys.maxsize)


def output_values(outputs: list, predictions: Any) -> list:
    """An event's return value as one value per output, as gradio's postprocess_data reads it."""
    if len(outputs) == 1:
        return [predictions]
    if isinstance(predictions, dict):
        if all(isinstance(key, Block) for key in predictions):
            return [predictions.get(block) for block in outputs]
        return []  # gr.skip() for every output
    return list(predictions) if isinstance(predictions, (list, tuple)) else []


DEFAULT_LIMITS = SessionLimits()


def bound_sessions(
    page: gr.Blocks, runtime: ChatRuntime, max_total_bytes: int | None = None
) -> SessionBounds:
    """Install the bounds on `page` (before launch): `DEFAULT_LIMITS`, all sessions together within
    `max_total_bytes` when given (`--session-memory-mb`)."""
    limits = DEFAULT_LIMITS
    if max_total_bytes is not None:
        limits = replace(limits, max_total_bytes=max_total_bytes)
    bounds = SessionBounds(runtime, limits)
    bounds.bound(page)
    return bounds
