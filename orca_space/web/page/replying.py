"""The page's reply functions: a new reply (ChatInterface's fn, also the `/chat` API) and
continue. Both are async generators, so that a stop or a closed tab closes them and the
backend request is cancelled when their chat stream closes.

Each update is the reply with a note under it (`reply_stats`): its figures while it streams,
then why it ended. A message sent while the model loads waits for it, the note showing the
progress, instead of being refused; only a failed load refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from time import monotonic

import gradio as gr

from ...chat import ChatService, PreparedChat
from ...engines.requests import EngineError
from ...params import PARAMETER_ORDER
from ...ratelimit import client_key
from ...reply_stats import (
    ReplyFigures,
    is_note,
    last_reply_figures,
    reply_message,
    settle,
    stats_note,
    waiting_note,
    without_notes,
)
from ...runtime import ChatRuntime
from ..refusals import in_page_words, refusal
from .prompt_view import prompt_view

log = logging.getLogger(__name__)
# Long enough for the first start on a Space (14.5 GB of weights, then the engine's warm-up);
# a chat still waiting after that is told to come back rather than held forever.
LOAD_WAIT_S = 20 * 60
LOAD_POLL_S = 0.25  # how often a waiting chat looks at the load status (a sleep, not a spin)
UNFORESEEN_FAILURE = "The reply ended by an unexpected error (logged on the server); try again."


def make_respond(runtime: ChatRuntime):
    # Named parameters, in PARAMETER_ORDER, so the API documents them by name.
    async def respond(
        message,
        history,
        system_message,
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        repetition_penalty,
        request: gr.Request,
    ):
        raw = raw_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        updates = new_reply(runtime, message, history, system_message, raw, request)
        # The note shows at once, and says "ended by an error" if anything below fails.
        async with contextlib.aclosing(failures_said(updates, [stats_note(ReplyFigures())])) as shown:
            async for update in shown:
                yield update

    return respond


async def new_reply(
    runtime: ChatRuntime, message, history, system_message, raw: dict, request: gr.Request | None
) -> AsyncIterator[tuple[list, object]]:
    """(the reply with its note, the prompt view's state once) as the reply streams."""
    enforce_rate_limit(runtime, request)
    async with contextlib.aclosing(wait_for_model(runtime)) as waiting:
        async for progress in waiting:
            yield [waiting_note(progress)], gr.skip()
    service = runtime.service
    chat = await prepared_or_error(service.prepare, message, without_notes(history), system_message, raw)
    warn_if_turns_were_left_out(runtime, chat)
    view = prompt_view(service.encoder, chat, runtime.context_length).as_state()
    # aclosing: a stop closes this generator, and must close the stream inside it at once.
    scope = visitor_scope(runtime, request)
    async with contextlib.aclosing(stream_figures(service, chat, scope)) as updates:
        async for figures, text in updates:
            yield [reply_message(text), stats_note(figures)], view
            view = gr.skip()  # the prompt panel's state is set once per reply


async def failures_said(
    updates: AsyncIterator[tuple[list, object]], first: list | None = None
) -> AsyncIterator[tuple[list, object]]:
    """The reply step's updates (`first` at once, when given); if they fail, one more update
    whose spinning note says "ended by an error", then the error as one sentence (an unforeseen
    one's trace goes to the log). A stop closes this generator and is no failure."""
    shown = first
    if first is not None:
        yield first, gr.skip()
    try:
        async with contextlib.aclosing(updates):
            async for shown, *rest in updates:
                yield (shown, *rest)
    except Exception as exc:  # a stop (GeneratorExit, CancelledError) is not an Exception
        if shown is not None:
            yield settle(shown, "failed"), gr.skip()
        if isinstance(exc, gr.Error):
            raise
        log.exception("a reply step failed")
        raise gr.Error(UNFORESEEN_FAILURE, print_exception=False) from None  # its trace is just above


def make_continue(runtime: ChatRuntime):
    """Continue the last reply (cut at max new tokens, or stopped): the same assistant message
    grows, and its note adds up the parts' tokens."""

    async def continue_reply(
        history,
        system_message,
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        repetition_penalty,
        request: gr.Request,
    ):
        raw = raw_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        updates = continued_reply(runtime, history, system_message, raw, request)
        async with contextlib.aclosing(failures_said(updates)) as shown:
            async for update in shown:
                yield update

    return continue_reply


async def continued_reply(
    runtime: ChatRuntime, history, system_message, raw: dict, request: gr.Request | None
) -> AsyncIterator[tuple[list, object]]:
    """(the whole chat with the reply growing, the prompt view's state once) as it streams."""
    enforce_rate_limit(runtime, request)
    service = runtime.service
    if service is None or not service.continues_replies:
        raise refusal("This backend cannot continue a reply; send a message such as “go on” instead.")
    history = list(history or [])
    earlier = last_reply_figures(history)
    shown = [message for message in history if not is_note(message)]
    if not shown or not isinstance(shown[-1], dict) or shown[-1].get("role") != "assistant":
        raise refusal("There is no reply to continue: the chat must end with one.")
    chat = await prepared_or_error(service.prepare_continuation, shown, system_message, raw)
    reply_so_far = chat.messages[-1]["content"]
    before_reply = history[: last_reply_index(history)]
    view = prompt_view(service.encoder, chat, runtime.context_length).as_state()
    scope = visitor_scope(runtime, request)
    async with contextlib.aclosing(stream_figures(service, chat, scope)) as updates:
        async for figures, text in updates:
            merged = earlier.followed_by(figures) if earlier is not None else figures
            yield [*before_reply, reply_message(reply_so_far + text), stats_note(merged)], view
            view = gr.skip()


def last_reply_index(history: list) -> int:
    """Where the last reply (not a note) is in the shown history."""
    return max(index for index, message in enumerate(history) if not is_note(message))


async def stream_figures(
    service: ChatService, chat: PreparedChat, scope: str | None = None
) -> AsyncIterator[tuple[ReplyFigures, str]]:
    """The reply's figures and text as it streams; an engine's error as one sentence. (A reply
    that fails after it began says so under it: `failures_said`.) `scope`: see `visitor_scope`."""
    try:
        # Closed explicitly, not whenever the garbage collector gets to it: closing the
        # stream is what cancels the request in the engine (or the HTTP stream) on a stop.
        async with contextlib.aclosing(service.stream(chat, notify=gr.Info, cache_scope=scope)) as updates:
            async for reply in updates:
                yield ReplyFigures.from_stats(reply.stats), reply.text
    except EngineError as exc:  # the engine's or server's own log has the details
        raise refusal(str(exc), logging.WARNING) from None


async def wait_for_model(runtime: ChatRuntime, timeout_s: float = LOAD_WAIT_S) -> AsyncIterator[str]:
    """Yield the loading progress (when it changes) until the chat service is there; raise
    gr.Error if loading fails or takes longer than `timeout_s`."""
    deadline = monotonic() + timeout_s
    shown = None
    while runtime.service is None:
        if runtime.status.failed:
            raise refusal(f"The model could not be loaded: {runtime.status.message}", logging.WARNING)
        if monotonic() > deadline:
            raise refusal(f"The model is still loading after {timeout_s / 60:.0f} minutes; try again later.")
        if (progress := loading_progress(runtime)) != shown:
            shown = progress
            yield progress
        await asyncio.sleep(LOAD_POLL_S)


def loading_progress(runtime: ChatRuntime) -> str:
    status = runtime.status
    percent = "" if status.fraction is None else f" {status.fraction:.0%}"
    return f"Waiting for the model: {status.message}{percent}"


def raw_params(max_new_tokens, temperature, top_p, top_k, repetition_penalty) -> dict[str, object]:
    raw = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
    }
    assert tuple(raw) == PARAMETER_ORDER
    return raw


async def prepared_or_error(prepare: Callable[..., PreparedChat], *args) -> PreparedChat:
    try:
        # Tokenizing a long history takes milliseconds: off the event loop, which streams
        # everyone else's replies.
        return await asyncio.to_thread(prepare, *args)
    except ValueError as exc:  # the user's input: the reason, in the page's words
        raise refusal(in_page_words(str(exc))) from None


def warn_if_turns_were_left_out(runtime: ChatRuntime, chat: PreparedChat) -> None:
    if chat.dropped_turns:
        gr.Warning(
            f"Left out the {chat.dropped_turns} oldest turn(s): the conversation no longer fits "
            f"the {runtime.context_length:,}-token context with {chat.params.max_new_tokens} new tokens."
        )


def visitor_scope(runtime: ChatRuntime, request: gr.Request | None) -> str | None:
    """Whose kept KV caches a reply may start from (engines/prefix_cache.py): this page's gradio
    session (one tab; a reload starts a new one), logged in or not: `--auth` is one account that
    everyone with the password shares, and one person's cache must not answer another's guess
    (issue #27); else the address as the rate limit reads it."""
    if request is None:
        return None
    if request.session_hash:
        return f"session:{request.session_hash}"
    return page_client(runtime, request)


def page_client(runtime: ChatRuntime, request: gr.Request) -> str:
    """Whom the page's limits count (messages a minute, links an hour): the address, trusting only
    our own proxies' X-Forwarded-For (`ratelimit.client_key`), not the shared login."""
    peer = request.client.host if request.client else None
    return client_key(peer, request.headers.get("x-forwarded-for"), runtime.trusted_proxy_hops)


def enforce_rate_limit(runtime: ChatRuntime, request: gr.Request | None) -> None:
    if runtime.limiter is None or request is None:
        return
    wait = runtime.limiter.acquire(page_client(runtime, request))
    if wait > 0:
        raise refusal(
            f"Too many messages: the limit is {runtime.limiter.limit} per minute. Try again in {wait:.0f} s."
        )
