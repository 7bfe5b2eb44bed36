"""What `GET /metrics` serves, in Prometheus' text format, with `prometheus_client`.

The names follow what vLLM users already scrape (`vllm:time_to_first_token_seconds` is
`orca_space_time_to_first_token_seconds` here), under one prefix:

- per reply, observed by the chat service for every backend (local, remote, ZeroGPU):
  `time_to_first_token_seconds` and `inter_token_latency_seconds` (histograms; from the request
  reaching the chat service, queueing and prompt included), `generation_tokens_total`, and
  `requests_finished_total{finished_reason="stop|length|cancelled|error"}` (as the caller saw
  the reply end: a stop string's cut is a stop);
- read from the engine at each scrape: `num_requests_running`, `num_requests_waiting`,
  `num_slots` (gauges), `kv_cache_kept_slots` (slots holding an ended request's cache, for a
  later prompt to start from), `prompt_tokens_prefilled_total` and `prompt_tokens_reused_total`
  (counters: vLLM's `prefix_cache_queries` is their sum, its `prefix_cache_hits` the second),
  `non_finite_replies_total`.

Each app has its own `CollectorRegistry` (tests run several apps in one process; the global
registry would refuse the second).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from time import monotonic

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engines.requests import EngineStats
from .replies import Reply, ReplyDelta

PREFIX = "orca_space_"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# vLLM's buckets, from 1 ms on a GPU to minutes in a long queue on a CPU.
FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


class ReplyMetrics:
    """The per-reply series; `observe` wraps a backend's stream of deltas."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.first_token = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Seconds from a request to its first generated token (queueing and prompt included).",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Seconds between successive generated tokens of a reply.",
            buckets=INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            f"{PREFIX}generation_tokens", "Tokens generated, over every reply.", registry=registry
        )
        self.finished = Counter(
            f"{PREFIX}requests_finished",
            "Replies that ended, by why: stop (the model ended its turn or a stop string), length "
            "(max new tokens), cancelled (a stop or a closed connection), error.",
            ["finished_reason"],
            registry=registry,
        )
        for reason in ("stop", "length", "cancelled", "error"):
            self.finished.labels(reason)  # every series from the start, at 0

    async def observe(self, deltas: AsyncIterator[ReplyDelta], started: float) -> AsyncIterator[ReplyDelta]:
        """Pass `deltas` through, timing each token from `started` (a monotonic time)."""
        last = None
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if delta.tokens:
                    now = monotonic()
                    if last is None:
                        self.first_token.observe(now - started)
                    else:
                        for _ in range(delta.tokens):  # a remote chunk may stand for several
                            self.inter_token.observe((now - last) / delta.tokens)
                    last = now
                    self.tokens.inc(delta.tokens)
                yield delta

    async def count_ending(self, replies: AsyncIterator[Reply]) -> AsyncIterator[Reply]:
        """Pass `replies` through (as the caller sees them, a stop string's cut included) and
        count how the reply ended, once."""
        reason = "cancelled"  # unless it finishes or fails: a stop closes this
        try:
            async with contextlib.aclosing(replies):
                async for reply in replies:
                    if reply.finished:
                        reason = reply.stats.finish_reason
                    yield reply
        except Exception:
            reason = "error"
            raise
        finally:
            self.finished.labels(reason).inc()


class EngineCollector:
    """The engine's own figures, read when scraped."""

    def __init__(self, engine_stats: Callable[[], EngineStats | None]) -> None:
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats() or EngineStats(alive=False, active=0, queued=0, capacity=0)
        yield GaugeMetricFamily(f"{PREFIX}num_requests_running", "Requests generating now.", stats.active)
        yield GaugeMetricFamily(f"{PREFIX}num_requests_waiting", "Requests waiting for a slot.", stats.queued)
        yield GaugeMetricFamily(f"{PREFIX}num_slots", "Requests that can generate at once.", stats.capacity)
        yield GaugeMetricFamily(
            f"{PREFIX}kv_cache_kept_slots",
            "KV-cache slots holding an ended request's cache, for a later prompt to start from.",
            stats.kept_caches,
        )
        yield CounterMetricFamily(
            f"{PREFIX}prompt_tokens_prefilled",
            "Prompt tokens run through the model.",
            stats.prompt_tokens_prefilled,
        )
        yield CounterMetricFamily(
            f"{PREFIX}prompt_tokens_reused",
            "Prompt tokens taken from a kept KV cache instead of being prefilled.",
            stats.prompt_tokens_reused,
        )
        yield CounterMetricFamily(
            f"{PREFIX}non_finite_replies",
            "Replies ended because the model's logits were not finite numbers.",
            stats.non_finite_replies,
        )


class AppMetrics:
    """One app's registry: the reply series and the engine's figures."""

    def __init__(self, engine_stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.replies = ReplyMetrics(self.registry)
        self.registry.register(EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
