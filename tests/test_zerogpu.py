"""ZeroGPU, on the CPU: detection and path selection, and a reply streamed through a stand-in for
`spaces.GPU` that forks a worker per call and pickles what crosses (tests/fake_spaces.py)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from gradio.exceptions import Error as GradioError

from orca_space import settings, zerogpu
from orca_space.chat import ChatLimits, ChatService
from orca_space.engines.reference import ReferenceEngine
from orca_space.engines.requests import EngineError
from orca_space.params import SamplingParams
from orca_space.settings import parse_settings
from orca_space.startup import start_runtime, start_zerogpu_runtime
from tests.fake_spaces import FakeZeroGPU
from tests.helpers import app_in_process, chat_through_api

GREEDY = dict(max_new_tokens=12, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, False),
        ({"SPACES_ZERO_GPU": "true"}, True),
        ({"SPACES_ZERO_GPU": "1"}, True),
        ({"SPACES_ZERO_GPU": "false"}, False),
    ],
)
def test_zerogpu_is_detected_as_spaces_detects_it(environ, expected):
    assert settings.on_zerogpu(environ) is expected
    assert parse_settings([], environ).zerogpu is expected


def test_zerogpu_can_be_forced():
    assert parse_settings(["--zerogpu"], {}).zerogpu and parse_settings([], {"ORCA_ZEROGPU": "1"}).zerogpu


def test_the_duration_asked_for_follows_the_reply_and_is_capped():
    short, long = (SamplingParams(max_new_tokens=n) for n in (50, 500))
    assert zerogpu.reply_duration([1] * 100, short, frozenset()) < zerogpu.reply_duration(
        [1] * 100, long, frozenset()
    )
    expected = (
        zerogpu.COLD_START_MARGIN_S + 100 / zerogpu.ASSUMED_PREFILL_TOK_S + 50 / zerogpu.ASSUMED_DECODE_TOK_S
    )
    assert zerogpu.reply_duration([1] * 100, short, frozenset()) == int(expected) + 1
    huge = SamplingParams(max_new_tokens=4096)
    assert zerogpu.reply_duration([1] * 8000, huge, frozenset()) == zerogpu.MAX_DURATION_S


@pytest.fixture()
def fake_spaces():
    return FakeZeroGPU()


@pytest.fixture()
def runtime(tiny_dir, fake_spaces):
    settings = parse_settings(["--model", str(tiny_dir), "--zerogpu"], {})
    runtime = start_zerogpu_runtime(settings, gpu=fake_spaces.GPU)
    assert runtime.status.ready, runtime.status.message
    return runtime


async def collect(service, chat, stop_after: int | None = None):
    replies = []
    stream = service.stream(chat)
    async for reply in stream:
        replies.append(reply)
        if stop_after is not None and len(replies) == stop_after:
            await stream.aclose()  # what a stop or a closed tab does
            break
    return replies


def test_zerogpu_loads_before_launch_and_serves_through_its_backend(runtime):
    assert runtime.zerogpu and isinstance(runtime.engine, zerogpu.ZeroGPUBackend)
    assert runtime.engine_choice.engine == "zerogpu" and "ZeroGPU" in runtime.status.message


def test_a_reply_streams_from_a_forked_worker_as_the_reference_engine_writes_it(
    runtime, fake_spaces, encoder, tiny_model
):
    service = ChatService(runtime.service.backend, encoder, ChatLimits(8192, update_interval_s=0))
    chat = service.prepare("Tell me about orcas.", [], "Be brief.", GREEDY)
    replies = asyncio.run(collect(service, chat))
    prompt = encoder.encode_chat(chat.messages)
    reference = ReferenceEngine(tiny_model, encoder.controls.stop_ids, 8192)  # the same checkpoint
    try:
        events = reference.submit(prompt, SamplingParams(**GREEDY)).collect(60)
    finally:
        reference.close()
    expected = [e.token for e in events if e.token is not None]
    assert len(replies) > 3, "the reply streams in pieces"
    assert replies[-1].text == runtime.engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert (
        replies[-1].stats.tokens == len(expected)
        and replies[-1].stats.finish_reason == events[-1].finish_reason
    )
    assert len(fake_spaces.workers) == 1 and fake_spaces.workers[0].exitcode == 0, (
        "one worker per call, ended"
    )
    assert fake_spaces.durations == [zerogpu.reply_duration(prompt, chat.params, encoder.controls.stop_ids)]


def test_a_stop_ends_the_worker(runtime, fake_spaces):
    service = ChatService(
        runtime.service.backend, runtime.service.encoder, ChatLimits(8192, update_interval_s=0)
    )
    chat = service.prepare(
        "Write a long story.", [], "", {**GREEDY, "max_new_tokens": 3000, "temperature": 1.0}
    )
    started = time.monotonic()
    replies = asyncio.run(collect(service, chat, stop_after=3))
    assert len(replies) == 3
    worker = fake_spaces.workers[0]
    worker.join(5)
    assert worker.exitcode is not None, "the worker (and with it the GPU time) ends on a stop"
    assert time.monotonic() - started < 30 and runtime.engine.stats().active == 0


def test_an_error_in_the_worker_comes_back_as_a_sentence(runtime, fake_spaces, monkeypatch):
    import torch

    from orca_space import zerogpu as module

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(module, "generate_tokens", out_of_memory)  # the fork inherits it
    service = runtime.service
    with pytest.raises(EngineError, match="the GPU ran out of memory for this request"):
        asyncio.run(collect(service, service.prepare("hi", [], "", GREEDY)))
    assert runtime.engine.stats().active == 0


@pytest.mark.parametrize(
    "title, message, expected",
    [
        (
            "ZeroGPU quota exceeded",
            "You have exceeded your ZeroGPU quota (90s requested vs. 30s left). Try again in 1:23:45. ",
            "refills in 1:23:45): log in",
        ),
        ("ZeroGPU quota exceeded", "You have exceeded your ZeroGPU runs limit. ", "used up for now"),
        (
            "ZeroGPU illegal duration",
            "The requested GPU duration (300s) is larger than the maximum allowed",
            "ask for fewer new tokens",
        ),
        ("ZeroGPU queue timeout", "No GPU was available after 60s. Retry later", "No GPU was free"),
        ("ZeroGPU client error", "No GPU was available", "No GPU was free"),
        ("ZeroGPU worker error", "GPU task aborted", "ran past the GPU time it asked for"),
        ("ZeroGPU worker error", "OutOfMemoryError", "ran out of memory"),
        ("ZeroGPU worker error", "ValueError", "The GPU call failed (ValueError)"),
    ],
)
def test_zerogpus_own_errors_become_one_sentence_that_says_what_to_do(title, message, expected):
    sentence = zerogpu.explain_zerogpu_failure(GradioError(message, title=title))
    assert expected in sentence and "Traceback" not in sentence


def test_a_cuda_error_in_the_worker_is_raised_so_that_zerogpu_drops_that_worker(
    runtime, fake_spaces, monkeypatch
):
    from orca_space import zerogpu as module

    def device_assert(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered (injected)")

    monkeypatch.setattr(module, "generate_tokens", device_assert)
    with pytest.raises(EngineError, match="a CUDA error"):
        asyncio.run(collect(runtime.service, runtime.service.prepare("hi", [], "", GREEDY)))
    fake_spaces.workers[-1].join(5)


def test_a_worker_that_dies_is_explained(runtime, monkeypatch):
    class AbortingGPU(FakeZeroGPU):
        def GPU(self, task=None, *, duration=None):  # noqa: N802
            def decorate(function):
                def call(*args):
                    yield 1
                    raise GradioError("GPU task aborted", title="ZeroGPU worker error")

                return call

            return decorate

    backend = zerogpu.ZeroGPUBackend(
        zerogpu.make_gpu_reply(None, AbortingGPU().GPU), runtime.service.encoder, runtime.engine.tokenizer, 1
    )
    service = ChatService(backend, runtime.service.encoder, ChatLimits(8192))
    with pytest.raises(EngineError, match="ended before the reply was finished"):
        asyncio.run(collect(service, service.prepare("hi", [], "", GREEDY)))


def test_without_zerogpu_the_normal_path_is_taken(tiny_dir):
    runtime = start_runtime(parse_settings(["--model", str(tiny_dir)], {}))
    try:
        assert not runtime.zerogpu
        deadline = time.monotonic() + 60
        while not runtime.status.ready:
            assert time.monotonic() < deadline and not runtime.status.failed
            time.sleep(0.05)
        assert runtime.engine_choice.engine == "eager"
    finally:
        runtime.engine.close()


def test_the_app_on_zerogpu_answers_through_a_worker_and_says_what_zerogpu_means(tiny_dir, monkeypatch):
    fake = FakeZeroGPU()
    monkeypatch.setattr(zerogpu, "spaces_gpu", lambda: fake.GPU)
    with app_in_process("--model", str(tiny_dir), "--zerogpu") as (url, runtime):
        assert runtime.zerogpu and httpx.get(f"{url}/healthz", timeout=5).json()["engine"] == "zerogpu"
        assert chat_through_api(url, "Hello!")[-1], "the chat is answered"
        assert len(fake.workers) == 1, "from a worker forked for that call"
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
        answer = httpx.post(
            f"{url}/v1/chat/completions", json=body, headers={"X-IP-Token": "visitor-7"}, timeout=60
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in (
            "stop",
            "length",
        )
        assert len(fake.workers) == 2 and fake.visitor_tokens[-1] == "visitor-7", (
            "an API call is charged to its own visitor's ZeroGPU quota, like a chat on the page"
        )
        page = httpx.get(url, timeout=5).text + json.dumps(httpx.get(f"{url}/config", timeout=5).json())
        assert "Running on ZeroGPU" in page and "daily" in page
