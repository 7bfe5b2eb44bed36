"""The engine through its interface, on the tiny checkpoint: streams, limits, stops, cancels, fails safely.

Batching itself (shared steps, chunked prefill, slots) is tested in test_batching.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from orca_space.engines.batched import BatchedEngine
from orca_space.params import SamplingParams
from tests.helpers import wait_until_idle

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture()
def engine(tiny_model, encoder):
    engine = BatchedEngine(tiny_model, encoder.controls.stop_ids, context_length=512)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompt(encoder):
    return encoder.encode_chat([{"role": "user", "content": "Tell me about orcas."}])


def tokens_of(events):
    return [e.token for e in events if e.token is not None]


def test_streams_tokens_then_one_final_event(engine, prompt):
    events = list(engine.submit(prompt, GREEDY))
    assert len(tokens_of(events)) == 24 and events[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in events[:-1]), "only the last event finishes"


def test_greedy_equals_transformers_generate(engine, tiny_model, prompt):
    ours = tokens_of(engine.submit(prompt, GREEDY))
    reference = tiny_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24)
    assert ours == reference[0, len(prompt) :].tolist()


def test_same_seed_same_sample_and_different_seed_differs(engine, prompt):
    params = SamplingParams(max_new_tokens=32, temperature=1.0, seed=7)
    first, again = tokens_of(engine.submit(prompt, params)), tokens_of(engine.submit(prompt, params))
    other = tokens_of(engine.submit(prompt, SamplingParams(max_new_tokens=32, temperature=1.0, seed=8)))
    assert first == again, "a seed makes sampling reproducible"
    assert first != other, "different seeds should give different samples at temperature 1"


def test_stops_at_a_stop_token_without_sending_it(engine, tiny_model, prompt):
    greedy = tokens_of(engine.submit(prompt, GREEDY))
    stop_at = 5
    engine = BatchedEngine(tiny_model, {greedy[stop_at]}, 512)
    events = list(engine.submit(prompt, GREEDY))
    engine.close()
    assert tokens_of(events) == greedy[:stop_at] and events[-1].finish_reason == "stop"


def test_stops_at_im_end(tiny_model, encoder, prompt, monkeypatch):
    """Force the model to say <|im_end|> first: the reply is empty and finishes with 'stop'."""
    original = tiny_model.lm_head.weight.data.clone()
    tiny_model.lm_head.weight.data[32000] = tiny_model.lm_head.weight.data.abs().max() * 1e3
    try:
        engine = BatchedEngine(tiny_model, encoder.controls.stop_ids, 512)
        events = list(engine.submit(prompt, SamplingParams(max_new_tokens=10, temperature=0.0)))
        engine.close()
    finally:
        tiny_model.lm_head.weight.data.copy_(original)
    assert tokens_of(events) == [] and events[-1].finish_reason == "stop"


def test_cancel_stops_within_a_step_and_next_request_works(engine, prompt):
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=400, temperature=1.0))
    received, already_streamed = 0, None
    for event in handle:
        if event.token is not None:
            received += 1
            if received == 3:
                handle.cancel()
                already_streamed = handle._events.qsize()  # sent before the cancel, not yet read
        else:
            break
    assert event.finish_reason == "cancelled"
    assert received <= 3 + already_streamed + 1, "cancel ends the stream within a step"
    assert wait_until_idle(engine, 2.0)
    assert tokens_of(engine.submit(prompt, GREEDY)), "the next request still works"


def test_requests_are_served_in_turn_with_separate_answers(engine, encoder):
    prompts = [encoder.encode_chat([{"role": "user", "content": f"question {i}"}]) for i in range(3)]
    solo = [tokens_of(engine.submit(p, GREEDY)) for p in prompts]
    results: dict[int, list[int]] = {}

    def ask(i):
        results[i] = tokens_of(engine.submit(prompts[i], GREEDY))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [results[i] for i in range(3)] == solo, "concurrent users get their own answers"
    assert len({tuple(s) for s in solo}) == 3


def test_queued_request_knows_its_place(tiny_model, encoder, prompt):
    engine = BatchedEngine(tiny_model, encoder.controls.stop_ids, context_length=512, slots=1)
    assert engine.wait_ready(30), engine.stats().failure
    first = engine.submit(prompt, SamplingParams(max_new_tokens=300, temperature=1.0))
    second = engine.submit(prompt, GREEDY)
    deadline = time.monotonic() + 30
    while engine.stats().active == 0:
        assert time.monotonic() < deadline, "the first request was never admitted"
        time.sleep(0.001)
    assert engine.position(second) == 1 and engine.stats().queued == 1
    first.cancel()
    assert list(second)[-1].finish_reason == "length"
    engine.close()


def test_a_request_with_a_free_slot_is_not_told_to_wait(tiny_model, encoder, prompt):
    engine = BatchedEngine(tiny_model, encoder.controls.stop_ids, context_length=512, slots=2)
    first = engine.submit(prompt, SamplingParams(max_new_tokens=300, temperature=1.0))
    second = engine.submit(prompt, GREEDY)
    assert engine.position(first) == 0 and engine.position(second) == 0, "two slots, two requests"
    third = engine.submit(prompt, GREEDY)
    assert engine.position(third) == 1, "the third waits for one of the two slots"
    first.cancel()
    assert [list(h)[-1].finish_reason for h in (second, third)] == ["length", "length"]
    engine.close()


def test_prompt_too_long_is_an_error_event(engine):
    events = list(engine.submit(list(range(5, 600)), GREEDY))
    assert events[-1].finish_reason == "error" and "does not fit" in events[-1].error


def test_exception_reaches_only_its_request(engine, prompt, monkeypatch):
    real = engine.eager_step
    calls = {"n": 0}

    def failing_once(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args)

    monkeypatch.setattr(engine, "eager_step", failing_once)
    events = list(engine.submit(prompt, GREEDY))
    assert events[-1].finish_reason == "error" and "ran out of memory" in events[-1].error
    assert engine.stats().alive
    assert list(engine.submit(prompt, GREEDY))[-1].finish_reason == "length", "the next request succeeds"


@pytest.mark.anyio
async def test_async_iteration_streams(engine, prompt):
    events = [e async for e in engine.submit(prompt, GREEDY)]
    assert len(tokens_of(events)) == 24 and events[-1].finish_reason == "length"
