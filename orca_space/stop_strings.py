"""Stop strings over streamed text: cut the reply before the first one, never show part of one.

A reply arrives in pieces, and a stop string can straddle two of them ("<|" then "end|>"). The
matcher holds back the end of what it has seen while that end could still grow into a stop
string, and lets it go once it cannot (or when the reply ends without one). What it has let go
is therefore always final: a stop string is never streamed in part and then taken back.

Text here is Python `str`, whole characters only (the detokenizer never yields half of one),
so a cut can never fall inside a character.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from .replies import Reply


class StopStringMatcher:
    """Feed pieces of a reply; get back the text that is safe to show now.

    After the first stop string is complete, `stopped` is True, `feed` has returned the text
    before it, and every later call returns "". A stop string is found wherever it starts,
    also across pieces; the earliest to complete wins, as generation would stop there.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings cannot be empty")
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""  # the end of the text so far that may begin a stop string

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        pending = self._held + text
        cut = first_stop_at(pending, self.stops)
        if cut is not None:
            self.stopped, self._held = True, ""
            return pending[:cut]
        keep = open_prefix_length(pending, self.stops)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """At the end of the reply: what was held back was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def first_stop_at(text: str, stops: Sequence[str]) -> int | None:
    """Where the stop string that completes first begins, or None.

    `text` only ever holds a held-back tail plus one new piece, and the held tail contains no
    complete stop string, so the one that completes first is the one whose end comes first
    (of two that end together, the longer: cutting there leaves neither in the text).
    """
    best: tuple[int, int] | None = None  # (end, start)
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best):
            best = (start + len(stop), start)
    return None if best is None else best[1]


def open_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that is the beginning of some stop string
    (shorter than that stop string: a complete one is found by `first_stop_at`)."""
    longest = max((len(stop) for stop in stops), default=1)
    for length in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-length:]
        if any(stop.startswith(tail) for stop in stops):
            return length
    return 0


async def cut_at_stops(replies: AsyncIterator[Reply], stops: Sequence[str]) -> AsyncIterator[Reply]:
    """Replies with what may be the start of a stop string held back; at the first stop string,
    a last reply that ends before it (`finish_reason` "stop"), and the source is closed, which
    cancels the rest of the reply. Token counts stay the backend's: up to the stop, included."""
    matcher = StopStringMatcher(stops)
    shown, seen = "", 0
    async with contextlib.aclosing(replies):
        async for reply in replies:
            shown += matcher.feed(reply.text[seen:])
            seen = len(reply.text)
            if matcher.stopped:
                yield replace(reply, text=shown, stats=replace(reply.stats, finish_reason="stop"))
                return
            if reply.finished:
                shown += matcher.flush()
            yield replace(reply, text=shown)  # log-probabilities (if asked) up to the stop, included
