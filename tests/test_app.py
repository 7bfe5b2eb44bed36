"""End to end: `python app.py` with the tiny checkpoint on loopback, driven through gradio_client."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from gradio_client import Client

from orca_space.chat import ChatLimits, ChatService, LocalBackend
from orca_space.engines.batched import BatchedEngine
from tests.helpers import API_ORDER, running_app

GREEDY = dict(max_new_tokens=48, temperature=0.0, top_p=0.95, top_k=40, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def app_url(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "app.log"
    with running_app("--model", str(tiny_dir), log_path=log) as url:
        yield url


@pytest.fixture()
def client(app_url):
    return Client(app_url, verbose=False)


def health(url):
    with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
        return json.load(response)


def submit(client, message, system="You are a test.", **params):
    values = {**GREEDY, **params}
    return client.submit(message, system, *(values[k] for k in API_ORDER), api_name="/chat")


def finish(job, timeout=60.0):
    """Poll with a deadline: a gradio_client job can hang on values it cannot send."""
    deadline = time.monotonic() + timeout
    while not job.done():
        assert time.monotonic() < deadline, "the job did not finish in time"
        time.sleep(0.05)
    return job.outputs()


def expected_greedy_reply(tiny_model, tokenizer, encoder, messages, max_new_tokens):
    """What the app must answer: the same checkpoint, greedy, run in this process."""
    import asyncio

    engine = BatchedEngine(tiny_model, encoder.controls.stop_ids, 8192)
    service = ChatService(LocalBackend(engine, encoder, tokenizer), encoder, ChatLimits())

    async def run():
        chat = service.prepare(
            messages[-1]["content"],
            messages[1:-1],
            messages[0]["content"],
            {**GREEDY, "max_new_tokens": max_new_tokens},
        )
        return [reply async for reply in service.stream(chat)][-1].text

    try:
        return asyncio.run(run())
    finally:
        engine.close()


def test_health_reports_ready_and_idle(app_url):
    body = health(app_url)
    assert body["status"] == "ok" and body["active"] == 0 and body["queued"] == 0


def test_chat_streams_a_multi_chunk_reply(client):
    # Greedy, so it never stops early; long enough to span many 50 ms screen updates.
    outputs = finish(submit(client, "Hello there!", temperature=0.0, max_new_tokens=800))
    assert len(outputs) > 5, "the reply arrives in many chunks"
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:])), "each streamed text extends the last"
    # (Random weights may emit invalid byte sequences, so U+FFFD is checked on real text elsewhere.)
    assert "<|im_" not in outputs[-1] and "</s>" not in outputs[-1], "control tokens never show"


def test_system_message_reaches_the_prompt(app_url, tiny_model, tokenizer, encoder):
    replies = []
    for system in ("You are a pirate.", "You are a careful mathematician."):
        client = Client(app_url, verbose=False)  # a fresh session: no history
        reply = finish(submit(client, "Who are you?", system=system))[-1]
        replies.append(reply)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Who are you?"}]
        assert reply == expected_greedy_reply(tiny_model, tokenizer, encoder, messages, 48), (
            "the app's greedy reply equals one computed for exactly this system message"
        )
    assert replies[0] != replies[1], "a different system message gives a different prompt"


def test_history_is_kept_between_calls(app_url, tiny_model, tokenizer, encoder):
    client = Client(app_url, verbose=False)  # gradio keeps the conversation per client session
    first = finish(submit(client, "First question?", max_new_tokens=8))[-1]
    second = finish(submit(client, "Second question?", max_new_tokens=16))[-1]
    messages = [
        {"role": "system", "content": "You are a test."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Second question?"},
    ]
    assert second == expected_greedy_reply(tiny_model, tokenizer, encoder, messages, 16)


@pytest.mark.parametrize(
    "message, params, fragment",
    [
        ("", {}, "message is empty"),
        ("hi", {"temperature": 5.0}, "Temperature must be in"),  # named as the page's sliders are
        ("hi", {"top_k": 0.5}, "Top-k must be a whole number"),
    ],
)
def test_bad_input_is_an_error_and_the_app_stays_up(client, app_url, message, params, fragment):
    job = submit(client, message, **params)
    finish(job)
    assert job.status().success is False, "a bad input must fail visibly, not look like an empty reply"
    with pytest.raises(Exception, match=fragment):
        job.result()
    assert health(app_url)["status"] == "ok"
    assert finish(submit(client, "still there?", max_new_tokens=4))[-1], "the next request works"


def test_cancel_frees_the_engine(client, app_url):
    job = submit(client, "Write a long story.", temperature=1.0, max_new_tokens=4000)
    deadline = time.monotonic() + 30
    while len(job.outputs()) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job.cancel()
    deadline = time.monotonic() + 6  # a leaked 4,000-token reply runs for 10 s and more here
    while health(app_url)["active"] != 0:
        assert time.monotonic() < deadline, "a cancelled chat must not keep generating"
        time.sleep(0.05)
    assert finish(submit(client, "next", max_new_tokens=4))[-1]


def test_rate_limit_refuses_politely_and_names_the_wait(tiny_dir):
    with running_app("--model", str(tiny_dir), env={"ORCA_RATE_LIMIT": "2"}) as url:
        client = Client(url, verbose=False)
        jobs = [submit(client, f"hello {i}", max_new_tokens=2) for i in range(3)]
        for job in jobs:
            finish(job)
        results = [job.status().success for job in jobs]
        assert results.count(True) == 2 and results.count(False) == 1, results
        refused = jobs[results.index(False)]
        with pytest.raises(Exception, match="limit is 2 per minute"):
            refused.result()
        assert health(url)["status"] == "ok"
