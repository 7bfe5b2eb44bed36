"""A conversation link's snapshot: the export file's JSON, checked as an imported file is. Pure.

A snapshot is exactly what "Download JSON" writes (messages with their figures, system message,
settings, model, when), so a shared conversation and an exported one are one format with one
set of checks (`transcript.parse_transcript`). It is checked twice: before it is stored, so that
the store holds only what an import would accept, and again when it is read back, because the
file on disk may be older than this code or changed behind its back. A snapshot can therefore
never carry a system turn into the history, nor anything but plain text into a prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ..reply_stats import settle
from ..transcript import Transcript, TranscriptError, conversation_json, parse_transcript
from .store import LinkRefused, readable_size


class SnapshotRefused(LinkRefused):
    """This conversation cannot be shared (or a stored one cannot be shown); the message says why."""


def take_snapshot(
    history: Sequence[Mapping[str, Any]],
    system_message: str,
    settings: Mapping[str, float],
    model: str,
    max_bytes: int,
    now: datetime | None = None,
) -> str:
    """The snapshot of the chat as the page shows it, checked; SnapshotRefused if it cannot be
    shared: nothing to share, over `max_bytes`, or refused by the import's checks."""
    try:
        # A reply still streaming is shared as far as it got, and says it was stopped there.
        text = conversation_json(settle(history), system_message, settings, model, now or datetime.now(UTC))
    except ValueError as exc:  # a message that is not text
        raise SnapshotRefused(f"this conversation cannot be shared: {exc}") from None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise SnapshotRefused(
            f"the conversation is {readable_size(size)}; a conversation link holds at most "
            f"{readable_size(max_bytes)} (start a new chat, or download it as a file)"
        )
    transcript = read_snapshot(text)
    if not transcript.messages:
        raise SnapshotRefused("there is nothing to share yet: send a message first")
    return text


def read_snapshot(text: str) -> Transcript:
    """The conversation a snapshot holds, through the import's checks; SnapshotRefused if any fails."""
    try:
        return parse_transcript(text)
    except TranscriptError as exc:
        raise SnapshotRefused(f"this conversation cannot be shared or shown: {exc}") from None
