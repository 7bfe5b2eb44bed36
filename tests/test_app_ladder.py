"""The app comes up on the next rung when one fails, and says so: a failure injected at each rung of
the engine ladder, the real app launched in this process (so the injection reaches its engine),
a chat through gradio_client, and the page's status line and /healthz naming the engine and why."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from gradio_client import Client

from orca_space.engines import kv_cache
from orca_space.web.page.ui import status_markdown
from tests.engine_fakes import hanging, perturbing, raising, use_fake_graphs
from tests.helpers import API_GREEDY, API_ORDER, app_in_process, chat_through_api


def health(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=5).json()


def assert_serves_on(url, runtime, engine: str, failed: list[str], reason_fragment: str) -> None:
    body = health(url)
    assert body["engine"] == engine, body
    assert [f["engine"] for f in body["fallback"]] == failed, body
    assert reason_fragment in body["fallback"][-1]["reason"], body["fallback"]
    line = status_markdown(runtime)  # what the page's status line shows once ready
    assert f"Running on the {engine} engine" in line and reason_fragment in line, line
    assert f"on the {engine} engine" in runtime.status.message, "the console's ready line names it too"
    assert chat_through_api(url, "Hello!")[-1], "a chat is answered"


def test_a_capture_that_raises_leaves_the_app_on_eager(tiny_dir, monkeypatch):
    """Also the packed-prefill case through the API: at --context-length 700 (no ring) a 690-token
    prompt and a 200-token one sent together both get their replies."""
    use_fake_graphs(monkeypatch, on_capture=raising("cudaErrorStreamCaptureUnsupported (injected)"))
    with app_in_process("--model", str(tiny_dir), "--context-length", "700") as (url, runtime):
        assert_serves_on(url, runtime, "eager", ["graphs"], "cudaErrorStreamCaptureUnsupported")
        encoder = runtime.service.encoder
        long_text = "orca " * 700
        long_text = long_text[: len(long_text) * 670 // len(encoder.encode_message("user", long_text))]
        replies: dict[str, list[str]] = {}
        sent = [
            threading.Thread(
                target=lambda: replies.update(long=chat_through_api(url, long_text, max_new_tokens=8))
            ),
            threading.Thread(
                target=lambda: replies.update(short=chat_through_api(url, "word " * 190, max_new_tokens=8))
            ),
        ]
        for thread in sent:
            thread.start()
        for thread in sent:
            thread.join(90)
        assert set(replies) == {"long", "short"} and all(r[-1] for r in replies.values()), replies.keys()


def test_a_capture_that_hangs_leaves_the_app_on_eager(tiny_dir, monkeypatch):
    release = threading.Event()
    use_fake_graphs(monkeypatch, on_capture=hanging(release))
    try:
        with app_in_process("--model", str(tiny_dir), "--warmup-timeout", "4") as (url, runtime):
            assert_serves_on(url, runtime, "eager", ["graphs"], "warm-up ran past the 4 s deadline")
    finally:
        release.set()


def test_graphs_that_fail_the_self_check_leave_the_app_on_eager(tiny_dir, monkeypatch):
    use_fake_graphs(monkeypatch, on_replay=perturbing(0.5))
    with app_in_process("--model", str(tiny_dir)) as (url, runtime):
        assert_serves_on(url, runtime, "eager", ["graphs"], "self-check failed")


def test_when_eager_cannot_warm_up_the_app_serves_on_the_reference_engine(tiny_dir, monkeypatch):
    use_fake_graphs(monkeypatch, on_capture=raising())

    def no_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(kv_cache, "allocate_kv_cache", no_memory)
    with app_in_process("--model", str(tiny_dir)) as (url, runtime):
        assert_serves_on(url, runtime, "reference", ["graphs", "eager"], "ran out of memory")
        assert "one reply at a time" in status_markdown(runtime), "the page says what the rung costs"
        # A stop on the reference engine frees it within a token.
        client = Client(url, verbose=False)
        values = {**API_GREEDY, "max_new_tokens": 3000, "temperature": 1.0}
        job = client.submit("Write a long story.", "", *(values[k] for k in API_ORDER), api_name="/chat")
        deadline = time.monotonic() + 30
        while len(job.outputs()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert health(url)["active"] == 1
        job.cancel()
        deadline = time.monotonic() + 6
        while health(url)["active"] != 0:
            assert time.monotonic() < deadline, "a stopped chat must not keep generate running"
            time.sleep(0.05)


@pytest.mark.parametrize("engine", ["eager", "reference"])
def test_a_named_engine_serves_and_healthz_names_it(tiny_dir, engine):
    with app_in_process("--model", str(tiny_dir), "--engine", engine) as (url, runtime):
        body = health(url)
        assert body["engine"] == engine and body["fallback"] == [] and "passed" in body["self_check"]
        assert status_markdown(runtime) == "", "the fastest engine asked for: nothing to warn about"
        assert chat_through_api(url, "Hi")[-1]
