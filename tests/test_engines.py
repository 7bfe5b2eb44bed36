"""Every local engine behind the one `Engine` interface, on the tiny checkpoint: each streams, stops,
cancels within a step and tells queued requests their place; the reference engine (transformers'
`generate`) and the batched one agree token for token when greedy."""

from __future__ import annotations

import time

import pytest
import torch

from orca_space.engines.batched import BatchedEngine
from orca_space.engines.reference import ReferenceEngine
from orca_space.params import SamplingParams
from tests.engine_fakes import use_fake_graphs
from tests.helpers import wait_until_idle

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
LONG = SamplingParams(max_new_tokens=2000, temperature=1.0)
KINDS = ["eager", "graphs", "reference"]


def build(kind: str, model, stop_ids, monkeypatch, slots: int | None = None):
    if kind == "reference":
        return ReferenceEngine(model, stop_ids, context_length=4096)
    if kind == "graphs":  # the graphs engine's host side (padded batches, captured shapes) on the CPU
        use_fake_graphs(monkeypatch)
    engine = BatchedEngine(model, stop_ids, context_length=4096, slots=slots, use_graphs=kind == "graphs")
    assert engine.wait_ready(30)
    return engine


@pytest.fixture(params=KINDS)
def make_engine(request, tiny_model, monkeypatch):
    engines = []

    def make(stop_ids=(32000, 32001), slots=None):
        engines.append(build(request.param, tiny_model, stop_ids, monkeypatch, slots))
        return engines[-1]

    make.kind = request.param
    yield make
    for engine in engines:
        engine.close()


@pytest.fixture(scope="module")
def prompt(encoder):
    return encoder.encode_chat([{"role": "user", "content": "Tell me about orcas, please."}])


def tokens_of(events):
    return [e.token for e in events if e.token is not None]


def test_streams_tokens_then_one_final_event(make_engine, prompt):
    events = make_engine().submit(prompt, GREEDY).collect(60)
    assert len(tokens_of(events)) == 24 and events[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in events[:-1]), "only the last event finishes"


def test_stops_at_a_stop_token_without_sending_it(make_engine, prompt):
    greedy = tokens_of(make_engine().submit(prompt, GREEDY).collect(60))
    events = make_engine(stop_ids={greedy[5]}).submit(prompt, GREEDY).collect(60)
    assert tokens_of(events) == greedy[:5] and events[-1].finish_reason == "stop"


def test_cancel_ends_the_request_within_a_step_and_the_next_works(make_engine, prompt):
    engine = make_engine()
    handle = engine.submit(prompt, LONG)
    received = 0
    for event in handle:
        if event.token is None:
            break
        received += 1
        if received == 3:
            handle.cancel()
            pending = handle._events.qsize()  # already sent, not yet read
    assert event.finish_reason == "cancelled" and received <= 3 + pending + 1
    assert wait_until_idle(engine, 2.0), "active back to 0"
    assert tokens_of(engine.submit(prompt, GREEDY).collect(60)), "the next request still works"


def test_a_request_waiting_for_the_engine_knows_its_place(make_engine, prompt):
    engine = make_engine(slots=1)
    first = engine.submit(prompt, LONG)
    deadline = time.monotonic() + 5
    while engine.stats().active == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    second, third = engine.submit(prompt, GREEDY), engine.submit(prompt, GREEDY)
    assert (engine.position(first), engine.position(second), engine.position(third)) == (0, 1, 2)
    assert engine.stats().queued == 2 and engine.stats().capacity == 1
    first.cancel()
    assert [h.collect(60)[-1].finish_reason for h in (second, third)] == ["length", "length"]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_reference_and_batched_engines_give_the_same_greedy_tokens(tiny_model, encoder, penalty):
    prompts = [
        encoder.encode_chat([{"role": "user", "content": text}])
        for text in ("Hi!", "Why is the sea salty? " * 9)
    ]
    params = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=penalty)
    reference = ReferenceEngine(tiny_model, encoder.controls.stop_ids, 4096)
    batched = BatchedEngine(tiny_model, encoder.controls.stop_ids, 4096)
    try:
        expected = [tokens_of(reference.submit(p, params).collect(60)) for p in prompts]
        together = [batched.submit(p, params) for p in prompts]
        assert [tokens_of(h.collect(60)) for h in together] == expected
        assert all(len(tokens) > 5 for tokens in expected)
    finally:
        reference.close()
        batched.close()


def test_a_seed_makes_the_reference_engine_repeat_itself(tiny_model, encoder, prompt):
    engine = ReferenceEngine(tiny_model, encoder.controls.stop_ids, 4096)
    try:
        params = SamplingParams(max_new_tokens=32, temperature=1.0, seed=11)
        first, again = (tokens_of(engine.submit(prompt, params).collect(60)) for _ in range(2))
        other = tokens_of(
            engine.submit(prompt, SamplingParams(max_new_tokens=32, temperature=1.0, seed=12)).collect(60)
        )
        assert first == again and first != other
    finally:
        engine.close()


def test_an_unseeded_request_after_a_seeded_one_is_not_predictable(tiny_model, encoder, prompt):
    engine = ReferenceEngine(tiny_model, encoder.controls.stop_ids, 4096)
    try:
        seeded, unseeded = (
            SamplingParams(max_new_tokens=16, temperature=1.0, seed=3),
            SamplingParams(max_new_tokens=16, temperature=1.0),
        )
        after = []
        for _ in range(2):
            engine.submit(prompt, seeded).collect(60)
            after.append(tokens_of(engine.submit(prompt, unseeded).collect(60)))
        assert after[0] != after[1], "the seed of the request before must not decide this one"
    finally:
        engine.close()


def test_non_finite_logits_end_a_reference_request_by_name(tiny_model, encoder, prompt):
    engine = ReferenceEngine(tiny_model, encoder.controls.stop_ids, 4096)
    calls = {"n": 0}

    def overflow_on_the_third_step(module, inputs, output):
        calls["n"] += 1
        return torch.full_like(output, float("nan")) if calls["n"] == 3 else output

    hook = tiny_model.lm_head.register_forward_hook(overflow_on_the_third_step)
    try:
        events = engine.submit(prompt, GREEDY).collect(60)
        hook.remove()
        assert events[-1].finish_reason == "error" and "not finite" in events[-1].error
        assert len(tokens_of(events)) == 2, "the tokens before the overflow were streamed"
        assert engine.stats().non_finite_replies == 1 and engine.stats().alive
        assert engine.submit(prompt, GREEDY).collect(60)[-1].finish_reason == "length", "the next one works"
    finally:
        hook.remove()
        engine.close()


def test_a_prompt_that_does_not_fit_is_an_error_event(make_engine):
    events = make_engine().submit(list(range(5, 4100)), GREEDY).collect(60)
    assert events[-1].finish_reason == "error" and "does not fit" in events[-1].error
