from __future__ import annotations

import pytest

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


def test_refused_requests_do_not_extend_the_wait():
    clock = FakeClock()
    limiter = RateLimiter(1, window=10, clock=clock)
    limiter.acquire("a")
    for _ in range(5):
        limiter.acquire("a")
    clock.now += 10
    assert limiter.acquire("a") == 0.0


def test_logged_in_user_wins_over_address():
    assert client_key("alice", "10.0.0.1", "1.2.3.4", 1) == "user:alice"


def test_forwarded_for_is_ignored_without_trusted_proxies():
    """A client sending its own X-Forwarded-For cannot pick a fresh identity."""
    assert client_key(None, "203.0.113.9", "198.51.100.1", 0) == "ip:203.0.113.9"


def test_behind_a_trusted_proxy_the_last_hop_counts_not_the_spoofable_first():
    # The client claimed 6.6.6.6; our proxy appended the real peer 203.0.113.9.
    assert client_key(None, "10.0.0.2", "6.6.6.6, 203.0.113.9", 1) == "ip:203.0.113.9"
    assert client_key(None, "10.0.0.2", "6.6.6.6, 203.0.113.9, 10.0.0.7", 2) == "ip:203.0.113.9"


def test_missing_header_behind_proxy_falls_back_to_peer():
    assert client_key(None, "10.0.0.2", None, 1) == "ip:10.0.0.2"
