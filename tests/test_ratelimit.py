from __future__ import annotations

import tracemalloc

import pytest

from orca_space import ratelimit
from orca_space.ratelimit import RateLimiter, client_key


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_allows_up_to_the_limit_then_says_how_long_to_wait():
    clock = FakeClock()
    limiter = RateLimiter(3, window=60, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    clock.now += 10
    assert limiter.acquire("a") == pytest.approx(50.0), "the oldest hit expires 50 s from now"
    assert limiter.acquire("b") == 0.0, "other users are not affected"
    clock.now += 50
    assert limiter.acquire("a") == 0.0, "the window slid past the oldest hit"


def test_refused_retries_do_not_count_as_hits():
    """A client retrying while refused must be let in once its real hits expire, not stay locked out."""
    clock = FakeClock()
    limiter = RateLimiter(1, window=10, clock=clock)
    assert limiter.acquire("a") == 0.0
    for retry_at in (5.0, 9.0):
        clock.now = 1000.0 + retry_at
        assert limiter.acquire("a") == pytest.approx(10.0 - retry_at), "the wait counts from the real hit"
    clock.now = 1010.0
    assert limiter.acquire("a") == 0.0, "retries refused at 5 s and 9 s must not extend the lock to 19 s"


def test_forwarded_for_is_ignored_without_trusted_proxies():
    """A client sending its own X-Forwarded-For cannot pick a fresh identity."""
    assert client_key("203.0.113.9", "198.51.100.1", 0) == "ip:203.0.113.9"


def test_behind_a_trusted_proxy_the_last_hop_counts_not_the_spoofable_first():
    # The client claimed 6.6.6.6; our proxy appended the real peer 203.0.113.9.
    assert client_key("10.0.0.2", "6.6.6.6, 203.0.113.9", 1) == "ip:203.0.113.9"
    assert client_key("10.0.0.2", "6.6.6.6, 203.0.113.9, 10.0.0.7", 2) == "ip:203.0.113.9"


def test_missing_header_behind_proxy_falls_back_to_peer():
    assert client_key("10.0.0.2", None, 1) == "ip:10.0.0.2"


def test_a_hit_expires_exactly_one_window_later_and_the_new_one_counts():
    clock = FakeClock()
    limiter = RateLimiter(1, window=10, clock=clock)
    limiter.acquire("a")
    clock.now += 10
    assert limiter.acquire("a") == 0.0, "a hit exactly one window old no longer counts"
    assert limiter.acquire("a") > 0, "the request let in at the window's edge is itself counted"


def test_the_default_window_is_a_minute():
    """The setting and the error message both say 'per minute'."""
    clock = FakeClock()
    limiter = RateLimiter(1, clock=clock)
    limiter.acquire("a")
    assert limiter.acquire("a") == pytest.approx(60.0)
    clock.now += 60
    assert limiter.acquire("a") == 0.0


@pytest.mark.parametrize("limit, window", [(0, 60.0), (-1, 60.0), (1, 0.0), (1, -5.0), (0, 0.0)])
def test_a_limiter_that_would_refuse_or_allow_everything_is_not_built(limit, window):
    with pytest.raises(ValueError, match="^limit must be at least 1 and window positive$"):
        RateLimiter(limit, window=window)


def test_a_window_under_a_second_is_allowed():
    clock = FakeClock()
    limiter = RateLimiter(1, window=0.5, clock=clock)
    limiter.acquire("a")
    assert limiter.acquire("a") == pytest.approx(0.5)


def test_a_header_with_exactly_as_many_entries_as_trusted_hops_is_believed():
    """Our first proxy may be the one that starts the header: its entry is the client's address."""
    assert client_key("10.0.0.2", "203.0.113.9", 1) == "ip:203.0.113.9"
    assert client_key("10.0.0.2", "203.0.113.9, 10.0.0.7", 2) == "ip:203.0.113.9"


def test_a_header_shorter_than_the_trusted_hops_falls_back_to_the_peer():
    """Fewer entries than proxies means the header did not come through our chain: trust none of it."""
    assert client_key("10.0.0.2", "203.0.113.9", 2) == "ip:10.0.0.2"
    assert client_key("10.0.0.2", " , ,", 1) == "ip:10.0.0.2", "blank entries are not addresses"


def test_clients_without_any_address_share_one_key_apart_from_real_addresses():
    assert client_key(None, None, 0) == client_key("", None, 1) == "ip:unknown"


# -- memory: idle clients are forgotten past MAX_TRACKED_CLIENTS --


def flood(limiter, clock, rounds: int, clients: int) -> None:
    """`rounds` windows, each with `clients` new addresses that send once and go idle."""
    for r in range(rounds):
        for c in range(clients):
            limiter.acquire(f"ip:flood-{r}-{c}")
        clock.now += limiter.window + 1


def traced_bytes_held_by_the_limiter() -> int:
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, ratelimit.__file__)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def test_memory_stays_bounded_however_many_addresses_come_and_go(monkeypatch):
    """An attacker rotating addresses must not grow the server's memory without end."""
    monkeypatch.setattr(ratelimit, "MAX_TRACKED_CLIENTS", 50)
    clock = FakeClock()
    limiter = RateLimiter(3, window=10, clock=clock)
    tracemalloc.start()
    try:
        flood(limiter, clock, rounds=2, clients=50)
        early = traced_bytes_held_by_the_limiter()
        flood(limiter, clock, rounds=20, clients=50)
        late = traced_bytes_held_by_the_limiter()
    finally:
        tracemalloc.stop()
    assert late < 2 * early, f"memory grew from {early} to {late} bytes over 1,000 one-off clients"


def test_forgetting_idle_clients_never_resets_an_active_clients_limit(monkeypatch):
    """Pruning goes by a client's newest hit: one with old hits and a recent one is still limited."""
    monkeypatch.setattr(ratelimit, "MAX_TRACKED_CLIENTS", 5)
    clock = FakeClock()
    limiter = RateLimiter(3, window=60, clock=clock)
    limiter.acquire("user:active")
    limiter.acquire("user:active")  # two old hits at t = 0 ...
    clock.now += 59
    limiter.acquire("user:active")  # ... and a recent one at t = 59: at its limit of 3
    clock.now += 1.5  # t = 60.5: the two old hits have expired, the recent one has not
    for c in range(10):  # past MAX_TRACKED_CLIENTS: the idle are forgotten
        limiter.acquire(f"ip:other-{c}")
    assert limiter.acquire("user:active") == 0.0
    assert limiter.acquire("user:active") == 0.0
    assert limiter.acquire("user:active") > 0, "the hit at t = 59 must still count after the pruning"
