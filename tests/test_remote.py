"""The remote backend: a fake server for the failure cases, a real `transformers serve` for the rest.

The real server is `transformers serve TINY_DIR` on loopback, started once for the module; the
last test kills it and starts it again. Whether the server really stops generating when a stream
is closed is read from its CPU time (/proc): a cancelled request must leave it idle.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gradio_client import Client

from orca_space.engines.requests import EngineError
from orca_space.loading import ModelLoadError
from orca_space.params import SamplingParams
from orca_space.remote import RemoteBackend
from orca_space.replies import ReplyDelta
from tests.helpers import API_ORDER, free_port, running_app, wait_for_url

HELLO = [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "Hello there!"}]
GREEDY = SamplingParams(max_new_tokens=60, temperature=0.0, repetition_penalty=1.0)
# Long enough that the tiny model is still generating when a test closes the stream (it runs
# at a few hundred tokens/s here, and greedy decoding of HELLO does not reach <|im_end|>).
LONG = SamplingParams(max_new_tokens=4096, temperature=0.0)
APP_PARAMS = dict(max_new_tokens=48, temperature=0.0, top_p=0.95, top_k=40, repetition_penalty=1.0)
IDLE_CPU_SECONDS = 0.15  # CPU time an idle server may use in a one-second window


# ---------------------------------------------------------------- the real server


class ServeProcess:
    """`transformers serve` on a fixed loopback port, which tests may kill and start again."""

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        self.model_dir = model_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        flags = f"--host 127.0.0.1 --port {self.port} --device cpu --log-level info".split()
        command = [
            sys.executable,
            "-m",
            "transformers.cli.transformers",
            "serve",
            str(self.model_dir),
            *flags,
        ]
        # The server must never download anything; our client must be allowed to talk to it.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_url(f"http://127.0.0.1:{self.port}/health", timeout=90, proc=self.proc)

    def kill(self) -> None:
        """SIGKILL, like a crash: connections break mid-stream instead of draining."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.proc.pid}/stat")
        if not stat.exists():
            pytest.skip("reading the server's CPU time needs Linux /proc")
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def cpu_used_over(self, seconds: float) -> float:
        start = self.cpu_seconds()
        time.sleep(seconds)
        return self.cpu_seconds() - start

    def cpu_once_quiet(self, within: float = 4.0) -> float:
        """The CPU time of the first one-second window that looks idle, or of the last one
        `within` seconds on. On a loaded machine the server may notice a closed connection a
        moment late; a leaked 4096-token reply keeps it busy far longer than that."""
        deadline = time.monotonic() + within
        used = self.cpu_used_over(1.0)
        while used >= IDLE_CPU_SECONDS and time.monotonic() < deadline:
            used = self.cpu_used_over(1.0)
        return used


@pytest.fixture(scope="module")
def serve(tiny_dir, tmp_path_factory) -> Iterator[ServeProcess]:
    server = ServeProcess(tiny_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """InferenceClient refuses every request under HF_HUB_OFFLINE; these tests need it off."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=60))


async def collect(stream: AsyncIterator[ReplyDelta]) -> list[str]:
    """The texts of the pieces that carry text."""
    return [delta.text async for delta in stream if delta.text]


def reply(backend: RemoteBackend, params: SamplingParams, messages=HELLO) -> str:
    return "".join(run(collect(backend.stream_reply(messages, params))))


# ---------------------------------------------------------------- a fake server for failures


class FakeServer:
    """An OpenAI-ish server whose answer is set per test; it records what it was sent."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[tuple[dict, dict]] = []  # (headers, body)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                fake.answer(self)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        if isinstance(self.mode, int):  # an HTTP error status
            body = json.dumps({"error": "Model is overloaded"}).encode()
            handler.send_response(self.mode)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.end_headers()
        handler.wfile.write(sse_chunk("Hel") + sse_chunk(None) + sse_chunk("lo"))  # None: an empty delta
        handler.wfile.flush()
        if self.mode == "ok":
            handler.wfile.write(sse_chunk(None, finish_reason="stop") + b"data: [DONE]\n\n")
        elif self.mode == "stall":
            time.sleep(2)  # longer than the client's timeout
        elif self.mode == "cut":
            handler.connection.shutdown(socket.SHUT_RDWR)  # no finish_reason, no [DONE]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sse_chunk(content: str | None, finish_reason: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    chunk = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "system_fingerprint": "",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


@pytest.fixture()
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


def fake_backend(fake: FakeServer, **kwargs) -> RemoteBackend:
    return RemoteBackend(endpoint=fake.url, model="test-model", **{"timeout": 5.0, **kwargs})


def test_streams_deltas_and_skips_chunks_without_content(fake):
    deltas = run(collect(fake_backend(fake).stream_reply(HELLO, GREEDY)))
    assert deltas == ["Hel", "lo"], "deltas pass through as they come; an empty delta is not an error"


@pytest.mark.parametrize(
    "server_says, we_say", [("stop", "stop"), ("length", "length"), ("eos_token", "stop")]
)
def test_counts_tokens_and_passes_the_finish_reason_on(fake, monkeypatch, server_says, we_say):
    def answer(handler):
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.end_headers()
        handler.wfile.write(sse_chunk("Hel") + sse_chunk(None) + sse_chunk("lo"))
        handler.wfile.write(sse_chunk(None, finish_reason=server_says) + b"data: [DONE]\n\n")

    monkeypatch.setattr(fake, "answer", answer)

    async def pieces():
        return [d async for d in fake_backend(fake).stream_reply(HELLO, GREEDY)]

    got = run(pieces())
    assert sum(d.tokens for d in got) == 2, "a token per chunk that carries text"
    assert got[-1] == ReplyDelta(finish_reason=we_say) and all(d.finish_reason is None for d in got[:-1])


def test_sends_model_messages_and_openai_sampling_fields(fake):
    params = SamplingParams(
        max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.2, seed=3
    )
    run(collect(fake_backend(fake).stream_reply(HELLO, params)))
    body = fake.requests[0][1]
    assert body["model"] == "test-model" and body["messages"] == HELLO and body["stream"] is True
    sent = {
        k: body.get(k) for k in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")
    }
    assert sent == dict(max_tokens=7, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.2, seed=3)


def test_temperature_zero_asks_for_greedy_and_top_k_zero_is_left_out(fake):
    run(collect(fake_backend(fake).stream_reply(HELLO, SamplingParams(temperature=0.0, top_k=0))))
    body = fake.requests[0][1]
    assert body["temperature"] == 0.0, "vLLM and current TGI treat 0 as greedy"
    assert "top_k" not in body and "top_p" not in body, "irrelevant to greedy decoding"


def test_sends_exactly_the_api_key_it_was_given(fake, monkeypatch):
    # InferenceClient would otherwise fill in the local Hugging Face token for any URL.
    monkeypatch.setenv("HF_TOKEN", "hf_must_not_leak")
    run(collect(fake_backend(fake).stream_reply(HELLO, GREEDY)))
    run(collect(fake_backend(fake, api_key="secret").stream_reply(HELLO, GREEDY)))
    assert "authorization" not in fake.requests[0][0]
    assert fake.requests[1][0]["authorization"] == "Bearer secret"


@pytest.mark.parametrize("status", [429, 503])
def test_overloaded_server_gets_a_plain_sentence(fake, status):
    fake.mode = status
    with pytest.raises(EngineError) as caught:
        run(collect(fake_backend(fake).stream_reply(HELLO, GREEDY)))
    message = str(caught.value)
    assert message == f"The model server at {fake.url} is overloaded (HTTP {status}); try again in a moment."


def test_other_http_errors_say_the_status_and_the_servers_reason(fake):
    fake.mode = 500
    with pytest.raises(EngineError, match=r"failed \(HTTP 500\): Model is overloaded\.$"):
        run(collect(fake_backend(fake).stream_reply(HELLO, GREEDY)))


def test_a_silent_server_times_out_with_a_plain_sentence(fake):
    fake.mode = "stall"
    with pytest.raises(EngineError, match=r"did not answer within 0\.5 seconds"):
        run(collect(fake_backend(fake, timeout=0.5).stream_reply(HELLO, GREEDY)))


def test_a_reply_cut_short_is_an_error_not_a_short_reply(fake):
    fake.mode = "cut"
    with pytest.raises(EngineError, match="stopped before the reply was finished"):
        run(collect(fake_backend(fake).stream_reply(HELLO, GREEDY)))


def test_unreachable_server_gets_a_plain_sentence_and_the_next_request_works(fake):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    backend = RemoteBackend(endpoint=url, model="m", timeout=5.0)
    with pytest.raises(EngineError) as caught:
        run(collect(backend.stream_reply(HELLO, GREEDY)))
    assert str(caught.value).startswith(f"The model server at {url} is unreachable")
    assert "Traceback" not in str(caught.value)
    backend.endpoint = fake.url  # the server "comes back" (same backend object, no restart)
    assert run(collect(backend.stream_reply(HELLO, GREEDY))) == ["Hel", "lo"]
    assert backend.stats().active == 0, "failed streams are not counted as in flight"


def test_offline_mode_is_refused_at_startup_with_the_reason(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        RemoteBackend(endpoint="http://127.0.0.1:9/v1", model="m")


# ---------------------------------------------------------------- against transformers serve


def test_streams_a_multi_chunk_reply_from_transformers_serve(serve, tiny_dir):
    backend = RemoteBackend(endpoint=serve.url, model=str(tiny_dir), timeout=30)
    seen_active = []

    async def stream() -> list[str]:
        deltas = []
        async for delta in backend.stream_reply(HELLO, GREEDY):
            if delta.text:
                deltas.append(delta.text)
            seen_active.append(backend.stats().active)
        return deltas

    deltas = run(stream())
    assert len(deltas) > 10 and all(deltas), "one non-empty delta per token or so"
    assert set(seen_active) == {1} and backend.stats().active == 0, "stats count the streams in flight"


def test_sampling_parameters_reach_transformers_serve(serve, tiny_dir):
    # transformers serve ignores temperature for a model whose generation config does not
    # sample, and answers 422 to top_k; the backend's generation_config dialect fixes both.
    backend = RemoteBackend(endpoint=serve.url, model=str(tiny_dir), timeout=30)
    sampled = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    greedy = reply(backend, GREEDY)
    assert reply(backend, replace(GREEDY, seed=7)) == greedy, "temperature 0 is greedy"
    one, two = reply(backend, replace(sampled, seed=1)), reply(backend, replace(sampled, seed=2))
    assert one != two, "temperature 1 samples, so different seeds give different text"
    assert reply(backend, replace(sampled, seed=1)) == one, "a seed reproduces"
    top1 = replace(GREEDY, temperature=1.0, top_k=1, seed=5)
    assert reply(backend, top1) == greedy, "top_k=1 sampling is greedy, so top_k reached the server"
    assert reply(backend, replace(GREEDY, repetition_penalty=2.0)) != greedy, (
        "repetition_penalty reached the server"
    )


def test_closing_the_stream_stops_generation_on_the_server(serve, tiny_dir):
    backend = RemoteBackend(endpoint=serve.url, model=str(tiny_dir), timeout=30)

    async def read_some_then_close() -> tuple[float, float]:
        stream = backend.stream_reply(HELLO, LONG)
        arrived = []
        for _ in range(20):
            await anext(stream)
            arrived.append(time.monotonic())
        busy = await asyncio.to_thread(serve.cpu_used_over, 1.0)  # still generating, unread
        await stream.aclose()  # what gradio does on stop or a closed tab
        # A leaked reply would run on for about this long at the pace the server kept; a loaded
        # machine slows both that and the server's noticing the close, so the wait for quiet
        # scales with it, at a third of the leak so that a leak still shows.
        leak_s = (arrived[-1] - arrived[4]) / 15 * (LONG.max_new_tokens - 20)
        # Measured while this loop still runs: asyncio.run's own clean-up would close a
        # leaked stream at the end and hide the leak.
        idle = await asyncio.to_thread(serve.cpu_once_quiet, min(max(4.0, leak_s / 3), 20.0))
        return busy, idle

    busy, idle = run(read_some_then_close())
    assert busy > IDLE_CPU_SECONDS, "control: the server is busy while the long reply is open"
    assert idle < IDLE_CPU_SECONDS, "the server stopped generating the closed stream"
    assert backend.stats().active == 0
    started = time.monotonic()
    assert reply(backend, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert time.monotonic() - started < 10, "the server's one generation thread is free again"


# ---------------------------------------------------------------- the whole app, remote


@pytest.fixture(scope="module")
def app_url(serve, tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "app.log"
    args = ["--backend", "remote", "--endpoint", serve.url, "--model", str(tiny_dir)]
    with running_app(*args, "--request-timeout", "20", env={"HF_HUB_OFFLINE": "0"}, log_path=log) as url:
        yield url


@pytest.fixture()
def client(app_url) -> Client:
    return Client(app_url, verbose=False)


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
        return json.load(response)


def submit(client: Client, message: str, **params):
    values = {**APP_PARAMS, **params}
    return client.submit(message, "You are a test.", *(values[k] for k in API_ORDER), api_name="/chat")


def finish(job, timeout: float = 60.0) -> list[str]:
    """Poll with a deadline: a gradio_client job can hang on values it cannot send."""
    deadline = time.monotonic() + timeout
    while not job.done():
        assert time.monotonic() < deadline, "the job did not finish in time"
        time.sleep(0.05)
    return job.outputs()


def wait_for_outputs(job, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(job.outputs()) < count:
        assert not job.done(), f"the job ended early: {job.outputs()[-1:]!r}, {job.exception(0)!r}"
        assert time.monotonic() < deadline, "the reply did not start streaming"
        time.sleep(0.05)


def failure(job) -> str:
    """The gr.Error message of a job that must have failed."""
    finish(job)
    assert job.status().success is False, f"the job should fail, but it answered {job.outputs()[-1:]!r}"
    return str(job.exception(0))


def test_app_streams_a_multi_chunk_reply_from_the_server(app_url, client):
    assert health(app_url)["status"] == "ok"
    job = submit(client, "Hello there!", max_new_tokens=800)  # spans many 50 ms screen updates
    outputs = finish(job)
    assert job.status().success is True
    assert len(outputs) > 5, "the reply arrives in many chunks"
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:])), "each streamed text extends the last"


def test_app_still_validates_before_calling_the_server(client):
    assert "empty" in failure(submit(client, "   "))
    assert "Top-p must be in" in failure(submit(client, "Hi", top_p=0.0))


def test_app_stop_closes_the_servers_stream(app_url, client, serve):
    job = submit(client, "Hello there!", max_new_tokens=4096)
    wait_for_outputs(job, 10)
    assert serve.cpu_used_over(1.0) > IDLE_CPU_SECONDS, "control: the server is generating"
    job.cancel()
    assert serve.cpu_once_quiet() < IDLE_CPU_SECONDS, "the server stopped generating the cancelled reply"
    assert health(app_url)["active"] == 0, "the app's stream ended too"


def test_app_survives_the_server_going_away_and_coming_back(app_url, client, serve):
    job = submit(client, "Hello there!", max_new_tokens=4096)
    wait_for_outputs(job, 10)
    serve.kill()  # mid-reply
    assert "before the reply was finished" in failure(job)
    assert "is unreachable" in failure(submit(client, "Are you there?"))
    assert health(app_url)["status"] == "ok", "the app stays up while the server is down"
    serve.start()
    outputs = finish(job := submit(client, "Welcome back!"))
    assert job.status().success is True and len(outputs) > 1, (
        "the next message works without restarting the app"
    )


@pytest.mark.browser
def test_browser_chat_against_the_remote_backend(app_url, serve):
    """The same real-browser flow as test_browser.py, with replies from transformers serve."""
    from tests.browser_flow import chat_in_browser, chromium_page, require_chromium

    require_chromium()
    with chromium_page() as page:
        chat = chat_in_browser(page, app_url)
    assert len(chat.reply_lengths) >= 4 and chat.second_reply.strip()


@pytest.mark.browser
def test_browser_says_a_reply_cut_by_the_server_ended_by_an_error(app_url, serve):
    """The server dies mid-reply: the page keeps the text it showed, the line under the reply says
    it ended by an error (not "stopped": the page's clean-up steps run on both), and the chat is
    usable again once the server is back."""
    from playwright.sync_api import expect

    from tests.browser_flow import (
        BOT_MESSAGES,
        CHAT_TEXTBOX,
        REPLY_STATS,
        chromium_page,
        open_settings,
        send,
        set_max_new_tokens,
        set_slider,
        watch_reply_grow,
    )

    with chromium_page() as page:
        page.set_default_timeout(60_000)
        page.goto(app_url)
        box = page.locator(CHAT_TEXTBOX)
        open_settings(page)
        set_slider(page, "Temperature", 0)  # greedy: it runs all 4,000 tokens on the tiny model
        set_max_new_tokens(page, 4000)
        send(box, "Tell me a long story.")
        reply = page.locator(BOT_MESSAGES).last
        watch_reply_grow(page, reply, 3, timeout_s=60)
        try:
            serve.kill()
            expect(page.locator(REPLY_STATS).last).to_contain_text("ended by an error", timeout=20_000)
            expect(page.get_by_text("before the reply was finished").first).to_be_visible()
            expect(box, "the textbox is usable again after the error").to_be_enabled()
            assert reply.inner_text().strip(), "the text shown before the error stays"
        finally:
            serve.start()
        set_max_new_tokens(page, 20)
        send(box, "Are you back?")
        expect(page.locator(BOT_MESSAGES), "the next message gets a reply").to_have_count(2, timeout=60_000)
