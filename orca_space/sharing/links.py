"""Conversation links as the page uses them: share, open, delete, within the limits. No gradio.

`ConversationLinks` puts the snapshot's checks, the store and the per-visitor limit together;
the page (`web/page/share_panel.py`, `web/page/link_page.py`) only turns its answers and its `LinkError`s
into components and messages. Sharing stores text, never engine state, so it works the same
with every backend (local, remote, ZeroGPU) and while the model is still loading.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..ratelimit import RateLimiter
from ..transcript import Transcript
from .snapshot import read_snapshot, take_snapshot
from .store import DB_FILENAME, LinkError, LinkRefused, LinkStore, NewLink, StoreLimits

log = logging.getLogger(__name__)
HOUR_S = 3600.0
# How often expired links are purged: "expired" means gone from the disk within this (and at start).
PURGE_INTERVAL_S = 60.0


@dataclass(frozen=True)
class SharedConversation:
    """A link's conversation, checked, and when it was shared (Unix time)."""

    id: str
    transcript: Transcript
    created_at: float
    expires_at: float | None


class ConversationLinks:
    def __init__(self, store: LinkStore, per_hour: int = 0) -> None:
        """`per_hour`: links each visitor may make in an hour; 0 for no limit."""
        if per_hour < 0:
            raise ValueError("per_hour must be 0 (no limit) or more")
        self.store = store
        self.limiter = RateLimiter(per_hour, window=HOUR_S) if per_hour else None

    @classmethod
    def in_directory(cls, data_dir: Path, limits: StoreLimits, per_hour: int) -> ConversationLinks:
        return cls(LinkStore(Path(data_dir) / DB_FILENAME, limits), per_hour)

    def share(
        self,
        history: Sequence[Mapping[str, Any]],
        system_message: str,
        settings: Mapping[str, float],
        model: str,
        visitor: str,
    ) -> NewLink:
        """Store a snapshot of the chat; raises LinkError (refused, or the store unavailable).
        Only a link made counts against the visitor's limit."""
        snapshot = take_snapshot(
            history, system_message, settings, model, self.store.limits.max_snapshot_bytes
        )
        if self.limiter is not None and (wait := self.limiter.acquire(visitor)) > 0:
            raise LinkRefused(
                f"too many conversation links: the limit is {self.limiter.limit} an hour; "
                f"try again in {max(1, round(wait / 60))} min"
            )
        try:
            return self.store.create(snapshot)
        except LinkError:  # full or unavailable: no link, so nothing to count
            if self.limiter is not None:
                self.limiter.give_back(visitor)
            raise

    def open(self, link_id: object) -> SharedConversation | None:
        """The link's conversation, or None when it is not here (deleted, expired, a wrong id);
        raises LinkError when the store cannot be read or the snapshot fails its checks."""
        stored = self.store.get(link_id)
        if stored is None:
            return None
        return SharedConversation(
            stored.id, read_snapshot(stored.snapshot), stored.created_at, stored.expires_at
        )

    def delete(self, link_id: object, delete_token: object) -> bool:
        return self.store.delete(link_id, delete_token)


class ExpiredLinksPurge:
    """Purges expired links from the store at start and every `interval_s`, on a daemon thread of
    its own: without it an expired link's text stayed in the file until someone made a link."""

    def __init__(self, store: LinkStore, interval_s: float = PURGE_INTERVAL_S) -> None:
        self.store = store
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-expiry-purge", daemon=True)

    def start(self) -> ExpiredLinksPurge:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def purge_once(self) -> int:
        try:
            purged = self.store.purge_expired()
        except LinkError:  # unavailable now (the store logged why); the next round tries again
            return 0
        if purged:
            log.info("conversation links: purged %d expired link(s)", purged)
        return purged

    def _run(self) -> None:
        while not self._stop.is_set():
            self.purge_once()
            self._stop.wait(self.interval_s)
