"""Letting a machine's request in: the same load limits and rate limit as the page's chats.

gradio's queue (`--max-queue`) bounds only gradio's own events, and the OpenAI-compatible
route and the MCP tool hand their requests straight to the chat service, so they check the
same load themselves: the engine's waiting line (requests beyond its `capacity`, the page's
included) may hold `max_queue` requests, and one more is refused at once. The rate limit is
the page's `RateLimiter`, keyed the same way (`client_key`), or by access key when one is used;
`/v1` has a limiter of its own (`api=True`, `--api-rate-limit`): a front end behind one key
(Open WebUI sends three or four calls per message) is not held to one person's pace.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat import ChatService
from ..ratelimit import client_key
from ..runtime import ChatRuntime

LOADING_RETRY_S = 10  # a load takes minutes; asking every few seconds costs nothing
QUEUE_FULL_RETRY_S = 2


class Refused(Exception):
    """Not now: `status` is 503 (not ready) or 429 (full, or too many requests)."""

    def __init__(self, status: int, kind: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Admission:
    runtime: ChatRuntime
    max_queue: int
    api: bool = False  # count by the runtime's `api_limiter`, not the page's `limiter`

    def admit(self, client: str) -> ChatService:
        """The chat service, or `Refused`. A refused request does not count against the limit."""
        service = self.ready_service()
        self.check_load()
        limiter = self.runtime.api_limiter if self.api else self.runtime.limiter
        if limiter is not None and (wait := limiter.acquire(client)) > 0:
            raise Refused(
                429,
                "rate_limit_exceeded",
                f"Too many requests: the limit is {limiter.limit} per minute. Try again in {wait:.0f} s.",
                retry_after_s=wait,
            )
        return service

    def ready_service(self) -> ChatService:
        runtime = self.runtime
        stats = runtime.engine_stats()
        if runtime.status.failed:
            raise Refused(
                503, "model_unavailable", f"The model could not be loaded: {runtime.status.message}"
            )
        if stats is not None and not stats.alive:
            raise Refused(503, "model_unavailable", f"The engine stopped: {stats.failure or 'unknown error'}")
        if runtime.service is None:
            raise Refused(
                503,
                "model_loading",
                f"The model is not ready yet: {runtime.status.message} Try again in a moment.",
                retry_after_s=LOADING_RETRY_S,
            )
        return runtime.service

    def check_load(self) -> None:
        stats = self.runtime.engine_stats()
        if stats is None:
            return
        waiting = stats.active + stats.queued - stats.capacity
        if waiting >= self.max_queue:
            raise Refused(
                429,
                "queue_full",
                f"The queue is full: {stats.capacity} replies are being written and {max(waiting, 0)} "
                "are waiting. Try again in a moment.",
                retry_after_s=QUEUE_FULL_RETRY_S,
            )


def request_client(
    runtime: ChatRuntime, peer: str | None, forwarded_for: str | None, key_index: int | None
) -> str:
    """The rate limit's key: the access key used, if any (each key is one client), else the
    address, read as the page reads it."""
    if key_index is not None:
        return f"key:{key_index}"
    return client_key(peer, forwarded_for, runtime.trusted_proxy_hops)
