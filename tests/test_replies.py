"""Reply streams: deltas added up into growing replies with figures from the backend's own events."""

from __future__ import annotations

import pytest

from orca_space import replies
from orca_space.chat import ChatLimits, ChatService, LocalBackend
from orca_space.engines.batched import BatchedEngine
from orca_space.params import SamplingParams
from orca_space.replies import Reply, ReplyDelta, ReplyStats, accumulate


async def deltas_at(timed, clock):
    for at, delta in timed:
        clock[0] = at
        yield delta


async def collect(stream):
    return [item async for item in stream]


@pytest.mark.anyio
async def test_figures_come_from_the_deltas_and_the_clock(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(replies, "monotonic", lambda: clock[0])
    timed = [
        (0.25, ReplyDelta("Hel", tokens=1)),
        (0.30, ReplyDelta("", tokens=1)),  # a byte piece held back by the detokenizer
        (0.35, ReplyDelta("lo\x00!", tokens=1)),
        (0.45, ReplyDelta("", finish_reason="length")),
    ]
    out = await collect(accumulate(deltas_at(timed, clock), prompt_tokens=17, started=0.0))
    assert [r.text for r in out] == ["Hel", "Hello!", "Hello!"], "an empty piece changes nothing shown"
    final = out[-1].stats
    assert final == ReplyStats(
        prompt_tokens=17, tokens=3, first_token_s=0.25, decode_s=pytest.approx(0.1), finish_reason="length"
    )
    assert final.tokens_per_s == pytest.approx(20.0), "2 tokens after the first, in 0.1 s"
    assert out[-1].finished and not out[0].finished


def test_a_rate_needs_two_tokens():
    assert ReplyStats(tokens=1, decode_s=0.0).tokens_per_s is None
    assert ReplyStats(tokens=0).tokens_per_s is None
    assert Reply().text == "" and not Reply().finished


@pytest.mark.anyio
@pytest.mark.parametrize("max_new_tokens, finish", [(6, "length"), (400, None)])
async def test_local_replies_count_the_engines_tokens(tiny_model, tokenizer, encoder, max_new_tokens, finish):
    engine = BatchedEngine(tiny_model, encoder.controls.stop_ids, context_length=1024)
    service = ChatService(
        LocalBackend(engine, encoder, tokenizer), encoder, ChatLimits(1024, update_interval_s=0)
    )
    try:
        params = dict(
            max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0
        )
        chat = service.prepare("Count for me.", [], "sys", params)
        last = (await collect(service.stream(chat)))[-1]
        handle = engine.submit(encoder.encode_chat(chat.messages), SamplingParams(**params))
        events = list(handle)
        generated = [e.token for e in events if e.token is not None]
    finally:
        engine.close()
    assert last.stats.tokens == len(generated), "one token per engine token event"
    assert last.stats.finish_reason == events[-1].finish_reason
    assert last.stats.prompt_tokens == len(encoder.encode_chat(chat.messages))
    assert last.text == tokenizer.decode(generated, skip_special_tokens=True)
    if finish:
        assert last.stats.finish_reason == finish
