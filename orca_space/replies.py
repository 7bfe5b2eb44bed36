"""What a reply stream carries: pieces from a backend, and the growing reply with its figures.

A backend (the local engine, a remote server) yields `ReplyDelta`s: text, how many tokens it
stands for, and on the last one why the reply ended. The chat service adds them up into
`Reply` snapshots (the text so far and its `ReplyStats`), which the page shows and the
OpenAI-compatible route turns back into deltas. The figures come from the backend's own
events (token counts, finish reasons), never guessed from the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from time import monotonic
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    from .engines.requests import TokenLogprobs

# "stop": the model ended its turn; "length": it reached max new tokens.
ReplyFinish = Literal["stop", "length"]


@dataclass(frozen=True)
class ReplyDelta:
    """A piece of a reply, from a backend."""

    text: str = ""
    tokens: int = 0  # generated tokens this piece accounts for (a held-back byte piece: 1, "")
    finish_reason: ReplyFinish | None = None  # on the last piece only
    # (token id, its log-probabilities) for each token, for requests that ask (the API's logprobs)
    logprobs: tuple[tuple[int, TokenLogprobs], ...] = ()


@dataclass(frozen=True)
class ReplyStats:
    prompt_tokens: int = 0
    tokens: int = 0  # generated so far (a final stop token not counted)
    first_token_s: float | None = None  # from the request to its first generated token
    decode_s: float | None = None  # from the first generated token to the latest
    finish_reason: ReplyFinish | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """The decode rate: tokens after the first over the time they took (None below 2)."""
        if self.tokens < 2 or not self.decode_s:
            return None
        return (self.tokens - 1) / self.decode_s


@dataclass(frozen=True)
class Reply:
    """The reply so far: what a chat window shows, and its figures."""

    text: str = ""
    stats: ReplyStats = field(default_factory=ReplyStats)
    logprobs: tuple[tuple[int, TokenLogprobs], ...] = ()  # every token's so far, when asked

    @property
    def finished(self) -> bool:
        return self.stats.finish_reason is not None


async def accumulate(
    deltas: AsyncIterator[ReplyDelta], prompt_tokens: int, started: float | None = None
) -> AsyncIterator[Reply]:
    """Add up a backend's deltas into growing replies: one for each delta that changes the text,
    and a last one when the reply finishes. NUL characters are dropped (a model can spell one in
    byte pieces, and the history check refuses NUL when the reply comes back as history)."""
    started = monotonic() if started is None else started
    reply = Reply(stats=ReplyStats(prompt_tokens=prompt_tokens))
    first_at: float | None = None
    async with contextlib.aclosing(deltas):  # a stop closes the backend's stream at once
        async for delta in deltas:
            stats = reply.stats
            if delta.tokens:
                now = monotonic()
                if first_at is None:
                    first_at = now
                    stats = replace(stats, first_token_s=now - started)
                stats = replace(stats, tokens=stats.tokens + delta.tokens, decode_s=now - first_at)
            if delta.finish_reason is not None:
                stats = replace(stats, finish_reason=delta.finish_reason)
            text = delta.text.replace("\x00", "")
            reply = Reply(reply.text + text, stats, reply.logprobs + delta.logprobs)
            if text or delta.finish_reason is not None:
                yield reply


T = TypeVar("T")
_END = object()


async def _next_or_end(source: AsyncIterator[T]) -> object:
    try:
        return await anext(source)
    except StopAsyncIteration:  # as a value: a task should not end by raising it
        return _END


async def coalesce(items: AsyncGenerator[T, None], interval: float) -> AsyncIterator[T]:
    """The latest of a stream of snapshots, at most once per `interval` seconds.

    The first item goes out at once. An item that arrives sooner is held, and goes out when its
    time comes even if the source has gone quiet meanwhile (the next item is awaited in a task,
    with a timeout). When the source ends, or fails, what is held goes out first. Closing this
    generator (a stop, a closed tab) cancels the pending read and closes the source.
    """
    latest, held, shown_at = None, False, -math.inf
    pending: asyncio.Task | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next_or_end(items))
            wait = max(0.0, shown_at + interval - monotonic()) if held else None
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if done:
                finished, pending = pending, None
                item = finished.result()  # the source's error, if it failed
                if item is _END:
                    break
                latest, held = item, True
                if monotonic() - shown_at < interval:
                    continue
            held, shown_at = False, monotonic()
            yield latest
        if held:
            yield latest
    except Exception:
        if held:  # show what arrived before the failure, then report it
            held = False
            yield latest
        raise
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})  # let the source unwind before closing it
        await items.aclose()
