"""The tokens-per-second meter behind the engine panel, on a fake clock."""

from __future__ import annotations

import threading

import pytest

from orca_space.throughput import ThroughputMeter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_is_tokens_over_the_last_minute():
    clock = FakeClock()
    meter = ThroughputMeter(window_s=60, clock=clock)
    clock.now += 60
    meter.add(600)
    assert meter.rate() == pytest.approx(10.0)
    clock.now += 30
    meter.add(300)
    assert meter.rate() == pytest.approx(15.0), "both counts are inside the minute"
    clock.now += 31
    assert meter.rate() == pytest.approx(5.0), "the count older than a minute no longer counts"
    clock.now += 60
    assert meter.rate() == 0.0, "a quiet minute is a rate of zero"


def test_first_minute_divides_by_the_time_so_far():
    """Right after start, 100 tokens in 10 s is 10 tok/s, not 100/60."""
    clock = FakeClock()
    meter = ThroughputMeter(window_s=60, clock=clock)
    clock.now += 10
    meter.add(100)
    assert meter.rate() == pytest.approx(10.0)


def test_nothing_and_negative_counts_are_ignored():
    clock = FakeClock()
    meter = ThroughputMeter(clock=clock)
    meter.add(0)
    meter.add(-5)
    assert meter.rate() == 0.0
    with pytest.raises(ValueError, match="window_s"):
        ThroughputMeter(window_s=0)


def test_adds_from_many_threads_are_all_counted():
    clock = FakeClock()
    meter = ThroughputMeter(window_s=60, clock=clock)
    clock.now += 60

    def add_many():
        for _ in range(1000):
            meter.add(1)

    threads = [threading.Thread(target=add_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert meter.rate() == pytest.approx(8000 / 60), "no count was lost to a race"


@pytest.mark.anyio
async def test_the_chat_service_feeds_the_meter_with_every_streamed_token(encoder):
    from orca_space.chat import ChatLimits, ChatService
    from orca_space.replies import ReplyDelta

    class Backend:
        async def stream_reply(self, messages, params, notify=None, cache_scope=None):
            for piece in ("one", " two", " three"):
                yield ReplyDelta(piece, tokens=2)
            yield ReplyDelta(finish_reason="stop")

    clock = FakeClock()
    meter = ThroughputMeter(window_s=60, clock=clock)
    clock.now += 60
    service = ChatService(Backend(), encoder, ChatLimits(update_interval_s=0.0), meter=meter)
    chat = service.prepare("hi", [], "", {})
    replies = [reply async for reply in service.stream(chat)]
    assert replies[-1].stats.tokens == 6
    assert meter.rate() == pytest.approx(6 / 60), "each token is counted once, however the updates coalesce"
