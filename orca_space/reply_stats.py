"""The quiet line under each reply, and the page's other notes in the chat. Pure: no gradio.

Under a reply the page shows its figures from the engine's own events (`ReplyStats`): tokens
generated, time to first token, tokens per second, and why it ended. They travel as a *note*: a
message dict that gradio's Chatbot draws as a small titled block (`metadata.title`) in the
reply's bubble. While the model loads, a note with a spinner stands where the reply will be.

Notes belong to the page, never to the model: `without_notes` takes them out of the history
before the chat service sees it. A stats note also carries its figures, machine-readable, in
its metadata id, so that continue, export and import can read them back from the history.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from .replies import ReplyStats

# "stop" and "length" come from the backend; "stopped" (the stop button) and "failed" from the page.
Ending = Literal["stop", "length", "stopped", "failed"]
ENDING_WORDS: dict[str, str] = {
    "stop": "finished",
    "length": "hit max new tokens",
    "stopped": "stopped",
    "failed": "ended by an error",
}
CONTINUABLE: frozenset[str] = frozenset({"length", "stopped"})  # a reply that was cut, not finished
STATS_ID_PREFIX = "reply-stats:"
WAITING_ID = "waiting-for-model"
STOPPED_WAITING = "Stopped while waiting for the model."
WAITING_FOR_FIRST_TOKEN = "Waiting for the first token…"

Message = Mapping[str, Any]


@dataclass(frozen=True)
class ReplyFigures:
    """What the line under a reply says. A continued reply adds up its parts' tokens; the
    timing and the ending are those of the latest part."""

    tokens: int = 0
    first_token_s: float | None = None
    tokens_per_s: float | None = None
    ending: Ending | None = None  # None while the reply is still coming
    parts: int = 1  # requests that wrote this reply: 1, plus one per continue

    @classmethod
    def from_stats(cls, stats: ReplyStats) -> ReplyFigures:
        return cls(stats.tokens, stats.first_token_s, stats.tokens_per_s, stats.finish_reason)

    def followed_by(self, later: ReplyFigures) -> ReplyFigures:
        """These figures with a continuation's appended."""
        return replace(later, tokens=self.tokens + later.tokens, parts=self.parts + later.parts)

    def ended(self, ending: Ending) -> ReplyFigures:
        return replace(self, ending=ending)

    @property
    def ending_words(self) -> str:
        return "" if self.ending is None else ENDING_WORDS[self.ending]

    @property
    def can_continue(self) -> bool:
        return self.ending in CONTINUABLE

    def summary(self) -> str:
        """`"42 tokens · first token 120 ms · 31.2 tok/s"`: what is known, in that order."""
        parts = [f"{self.tokens:,} token{'' if self.tokens == 1 else 's'}"]
        if self.parts > 1:
            parts[0] += f" in {self.parts} parts"
        if self.first_token_s is not None:
            parts.append(f"first token {format_seconds(self.first_token_s)}")
        if self.tokens_per_s is not None:
            rate = self.tokens_per_s
            parts.append(f"{rate:.0f} tok/s" if rate >= 100 else f"{rate:.1f} tok/s")
        return " · ".join(parts)

    def line(self) -> str:
        """The summary and, once the reply has ended, why: the line under the reply."""
        if self.ending is None and self.tokens == 0 and self.parts == 1:
            return WAITING_FOR_FIRST_TOKEN
        return f"{self.summary()} · {self.ending_words}" if self.ending else self.summary()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> ReplyFigures:
        """Figures from untrusted data (a note's id, an imported file); ValueError if malformed."""
        if not isinstance(data, Mapping) or set(data) - set(cls.__dataclass_fields__):
            raise ValueError(
                "reply figures must be an object with tokens, first_token_s, tokens_per_s, ending, parts"
            )
        figures = cls(**data)
        counts_ok = all(
            isinstance(n, int) and not isinstance(n, bool) for n in (figures.tokens, figures.parts)
        )
        times_ok = all(
            t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1e9)
            for t in (figures.first_token_s, figures.tokens_per_s)
        )
        if not counts_ok or figures.tokens < 0 or figures.parts < 1 or not times_ok:
            raise ValueError("reply figures must hold counts and non-negative times")
        if figures.ending is not None and not (
            isinstance(figures.ending, str) and figures.ending in ENDING_WORDS
        ):
            raise ValueError(f"reply ending must be one of {sorted(ENDING_WORDS)}, got {figures.ending!r}")
        return figures


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def stats_note(figures: ReplyFigures) -> dict[str, Any]:
    """The note under a reply: its figures with a spinner while it streams, then with why it
    ended. (One line of text: gradio's separate `log` field wraps badly on a phone.)"""
    metadata: dict[str, Any] = {
        "title": figures.line(),
        "id": STATS_ID_PREFIX + json.dumps(figures.to_dict(), separators=(",", ":")),
        "status": "pending" if figures.ending is None else "done",
    }
    return {"role": "assistant", "content": "", "metadata": metadata}


def waiting_note(progress: str) -> dict[str, Any]:
    """Where the reply will be, while the model loads: the loading progress, with a spinner."""
    return {
        "role": "assistant",
        "content": "",
        "metadata": {"title": progress, "id": WAITING_ID, "status": "pending"},
    }


def reply_message(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def note_id(message: Message) -> str | None:
    metadata = message.get("metadata") if isinstance(message, Mapping) else None
    note = metadata.get("id") if isinstance(metadata, Mapping) else None
    if isinstance(note, str) and (note.startswith(STATS_ID_PREFIX) or note == WAITING_ID):
        return note
    return None


def is_note(message: Message) -> bool:
    return note_id(message) is not None


def without_notes(history: object) -> object:
    """The history as the model should see it. Anything but a list is passed on untouched, for
    the chat service to refuse with its own words."""
    if not isinstance(history, list):
        return history
    return [message for message in history if not is_note(message)]


def read_figures(message: Message) -> ReplyFigures | None:
    """The figures a stats note carries, or None (not a stats note, or a malformed one)."""
    note = note_id(message)
    if note is None or not note.startswith(STATS_ID_PREFIX):
        return None
    try:
        return ReplyFigures.from_dict(json.loads(note[len(STATS_ID_PREFIX) :]))
    except (ValueError, TypeError):
        return None


def last_reply_figures(history: Sequence[Message]) -> ReplyFigures | None:
    """The figures under the conversation's last reply, if it ends with one."""
    return read_figures(history[-1]) if history else None


def settle(history: Sequence[Message], ending: Ending = "stopped") -> list[Message]:
    """The history once nothing streams any more: a note still spinning belongs to a reply that
    was stopped (or failed, or never started) and now says so."""
    return [settled_note(message, ending) for message in history]


def settled_after_failure(history: Sequence[Message]) -> list[Message]:
    """The history as the page's failure step leaves it (`chat_hooks.recover_from_errors`).

    A reply step settles its own note as "ended by an error" before it raises, and shows a
    note from its very first update on; so a last user message with neither a reply nor a
    note means the step failed before it could show anything (inside gradio, before the reply
    function ran) and gets a note saying so: a message never goes unanswered in silence. A
    note still spinning here belongs to a stopped reply (gradio runs this step on a stop too).
    """
    settled = settle(history)
    last = settled[-1] if settled else None
    if isinstance(last, Mapping) and last.get("role") == "user":
        settled.append(stats_note(ReplyFigures(ending="failed")))
    return settled


def settled_note(message: Message, ending: Ending) -> Message:
    metadata = message.get("metadata") if isinstance(message, Mapping) else None
    if not is_note(message) or not isinstance(metadata, Mapping) or metadata.get("status") != "pending":
        return message
    if metadata.get("id") == WAITING_ID and ending != "failed":
        return {**message, "metadata": {**metadata, "title": STOPPED_WAITING, "status": "done"}}
    figures = read_figures(message)
    return stats_note((figures or ReplyFigures()).ended(ending))


def reply_text(messages: object) -> str | None:
    """The reply's text in what the page's reply function yields (the reply and its notes), or
    None while there is only a note: what the `/chat` API returns instead of the page's list."""
    if isinstance(messages, str):
        return messages
    for message in messages if isinstance(messages, list) else [messages]:
        if isinstance(message, Mapping) and not is_note(message):
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None
