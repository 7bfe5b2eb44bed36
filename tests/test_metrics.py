"""GET /metrics' series (orca_space/metrics.py) and what the engine panel and /healthz say about
the prefix cache."""

from __future__ import annotations

import asyncio
from time import monotonic

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orca_space.engines.ladder import EngineChoice
from orca_space.engines.requests import EngineError, EngineStats
from orca_space.metrics import AppMetrics
from orca_space.replies import ReplyDelta, accumulate
from orca_space.runtime import ChatRuntime
from orca_space.web.page.engine_panel import prefix_cache_text
from orca_space.web.server import prefix_cache_fields

STATS = EngineStats(
    alive=True,
    active=2,
    queued=1,
    capacity=8,
    prefix_cache="private",
    kept_caches=5,
    prompt_tokens_prefilled=250,
    prompt_tokens_reused=750,
)


def samples(metrics: AppMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def deltas(*items, fail: bool = False):
    for item in items:
        await asyncio.sleep(0.01)
        yield item
    if fail:
        raise EngineError("boom")


async def drain(stream, stop_after: int | None = None) -> None:
    count = 0
    try:
        async for _ in stream:
            count += 1
            if count == stop_after:
                break
    finally:
        await stream.aclose()


def test_engine_figures_are_read_at_each_scrape():
    current = {"stats": STATS}
    metrics = AppMetrics(lambda: current["stats"])
    seen = samples(metrics)
    assert seen[("orca_space_num_requests_running", ())] == 2
    assert seen[("orca_space_num_requests_waiting", ())] == 1
    assert seen[("orca_space_num_slots", ())] == 8
    assert seen[("orca_space_kv_cache_kept_slots", ())] == 5
    assert seen[("orca_space_prompt_tokens_prefilled_total", ())] == 250
    assert seen[("orca_space_prompt_tokens_reused_total", ())] == 750
    current["stats"] = None  # still loading: zeros, not an error
    assert samples(metrics)[("orca_space_prompt_tokens_reused_total", ())] == 0


def test_each_reply_is_timed_and_counted_by_how_it_ended():
    metrics = AppMetrics(lambda: None)
    replies = metrics.replies

    def observed(*items, fail: bool = False):
        timed = replies.observe(deltas(*items, fail=fail), monotonic())
        return replies.count_ending(accumulate(timed, prompt_tokens=3, started=monotonic()))

    token, stop = ReplyDelta("a", tokens=1), ReplyDelta(finish_reason="stop")
    asyncio.run(drain(observed(token, token, ReplyDelta("bc", tokens=2), stop)))
    asyncio.run(drain(observed(token, token, token), stop_after=1))
    with pytest.raises(EngineError):
        asyncio.run(drain(observed(token, fail=True)))
    seen = samples(metrics)
    assert seen[("orca_space_time_to_first_token_seconds_count", ())] == 3
    assert 0.01 <= seen[("orca_space_time_to_first_token_seconds_sum", ())] < 3
    assert seen[("orca_space_inter_token_latency_seconds_count", ())] == 3, "1 + 2 tokens after a first"
    assert seen[("orca_space_generation_tokens_total", ())] == 4 + 1 + 1
    finished = {reason: seen[("orca_space_requests_finished_total", (("finished_reason", reason),))]
                for reason in ("stop", "length", "cancelled", "error")}  # fmt: skip
    assert finished == {"stop": 1, "length": 0, "cancelled": 1, "error": 1}


def test_two_apps_in_one_process_have_their_own_series():
    first, second = AppMetrics(lambda: STATS), AppMetrics(lambda: None)
    asyncio.run(drain(first.replies.observe(deltas(ReplyDelta("a", tokens=1)), 0.0)))
    assert samples(first)[("orca_space_generation_tokens_total", ())] == 1
    assert samples(second)[("orca_space_generation_tokens_total", ())] == 0


def runtime_with(choice: str | None) -> ChatRuntime:
    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.engine_choice = EngineChoice(choice) if choice else None
    return runtime


def test_the_engine_panel_says_what_is_reused():
    text = prefix_cache_text(STATS, runtime_with("eager"))
    assert text == (
        "each visitor's conversation kept for their next turn: 5 of 8 slots hold one; "
        "reused 75% of the prompt tokens so far"
    )
    off = EngineStats(True, 0, 0, 4, prefix_cache="off")
    assert "off (`--prefix-cache off`)" in prefix_cache_text(off, runtime_with("eager"))
    none = EngineStats(True, 0, 0, 1)
    assert prefix_cache_text(none, runtime_with("reference")) == "none: this engine prefills every prompt"
    assert "ZeroGPU worker" in prefix_cache_text(none, runtime_with("zerogpu"))
    remote = EngineStats(True, 0, 0, 16, prefix_cache="server")
    assert "remote server" in prefix_cache_text(remote, runtime_with(None))


def test_healthz_says_the_share_reused_and_no_counts_anyone_could_read_prompt_lengths_from():
    assert prefix_cache_fields(STATS) == {"mode": "private", "kept_slots": 5, "reused_share": 0.75}
    assert prefix_cache_fields(None) == {"mode": None}
    fresh = EngineStats(True, 0, 0, 4, prefix_cache="private")
    assert prefix_cache_fields(fresh)["reused_share"] is None, "no prompt yet: no share"
