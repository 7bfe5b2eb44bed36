"""The chat service: input checks, history fitting, and streaming through a backend."""

from __future__ import annotations

import asyncio
import re

import pytest

from orca_space.chat import ChatLimits, ChatService, LocalBackend, normalize_history
from orca_space.engines.batched import BatchedEngine
from orca_space.engines.requests import EngineError
from orca_space.params import SamplingParams
from orca_space.replies import ReplyDelta
from tests.helpers import wait_until_idle

DEFAULTS = dict(max_new_tokens=100, temperature=0.4, top_p=0.95, top_k=40, repetition_penalty=1.1)


class RecordingBackend:
    """A fake backend: remembers what it was asked and replies with fixed pieces."""

    def __init__(self, pieces=("Hel", "lo", "", " there")):
        self.pieces = pieces
        self.calls = []

    async def stream_reply(self, messages, params, notify=None, cache_scope=None):
        self.calls.append((messages, params))
        for piece in self.pieces:
            yield ReplyDelta(piece, tokens=1)


def make_service(encoder, backend=None, context_length=512, **limits):
    return ChatService(
        backend or RecordingBackend(), encoder, ChatLimits(context_length=context_length, **limits)
    )


async def collect(service, chat):
    return [reply.text async for reply in service.stream(chat)]


def test_prepare_builds_system_history_and_new_message(encoder):
    service = make_service(encoder)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat = service.prepare("how are you?", history, "Be brief.", DEFAULTS)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user"]
    assert chat.messages[0]["content"] == "Be brief." and chat.messages[-1]["content"] == "how are you?"
    assert chat.prompt_tokens == len(encoder.encode_chat(chat.messages))
    assert chat.params == SamplingParams(**DEFAULTS)


def test_blank_system_message_is_left_out(encoder):
    chat = make_service(encoder).prepare("hi", [], "   ", DEFAULTS)
    assert [m["role"] for m in chat.messages] == ["user"]


@pytest.mark.parametrize(
    "message, history, system, fragment",
    [
        ("", [], "s", "message is empty"),
        ("   \n", [], "s", "message is empty"),
        (None, [], "s", "message must be text"),
        (42, [], "s", "message must be text"),
        ("x" * 101, [], "s", "limit is 100"),
        ("hi", [], "s" * 101, "system message is 101 characters"),
        ("hi", "not a list", "s", "history must be a list"),
        ("hi", [{"role": "system", "content": "evil"}], "s", "only 'user' and 'assistant'"),
        ("hi", [{"role": "tool", "content": "x"}], "s", "history[0] has role 'tool'"),
        ("hi", [{"content": "no role"}], "s", "history[0] must be a message"),
        ("hi", [{"role": "user", "content": {"file": "/etc/passwd"}}], "s", "only text is supported"),
        ("a\x00b", [], "s", "NUL"),
    ],
)
def test_bad_input_gets_an_error_naming_the_problem(encoder, message, history, system, fragment):
    service = make_service(encoder, max_message_chars=100, max_system_chars=100)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        service.prepare(message, history, system, DEFAULTS)


def test_bad_parameter_is_named(encoder):
    with pytest.raises(ValueError, match="temperature"):
        make_service(encoder).prepare("hi", [], "", {**DEFAULTS, "temperature": float("nan")})


def test_history_in_gradio_parts_format_is_read():
    history = [{"role": "user", "content": [{"type": "text", "text": "hi "}, "there"], "metadata": None}]
    assert normalize_history(history, 100) == [{"role": "user", "content": "hi there"}]


def test_long_history_drops_oldest_turns_and_reports_it(encoder):
    service = make_service(encoder, context_length=300)
    history = []
    for i in range(10):
        history += [
            {"role": "user", "content": f"question {i} " * 5},
            {"role": "assistant", "content": "answer " * 5},
        ]
    chat = service.prepare("latest", history, "sys", {**DEFAULTS, "max_new_tokens": 100})
    assert chat.dropped_turns > 0 and chat.prompt_tokens <= 200
    assert chat.messages[1]["content"].startswith(f"question {10 - (10 - chat.dropped_turns)}")
    assert chat.messages[-1]["content"] == "latest"


def test_max_new_tokens_beyond_context_is_named(encoder):
    with pytest.raises(ValueError, match=r"max_new_tokens \(600\) must be below the context length \(512\)"):
        make_service(encoder).prepare("hi", [], "", {**DEFAULTS, "max_new_tokens": 600})


def test_message_too_long_for_context(encoder):
    service = make_service(encoder, context_length=300)
    with pytest.raises(ValueError, match="shorten it or lower max new tokens"):
        service.prepare("word " * 400, [], "", {**DEFAULTS, "max_new_tokens": 100})


@pytest.mark.anyio
async def test_stream_yields_growing_text(encoder):
    service = make_service(encoder, update_interval_s=0)
    texts = await collect(service, service.prepare("hi", [], "", DEFAULTS))
    assert texts == ["Hel", "Hello", "Hello there"], (
        "each update extends the previous; empty pieces are skipped"
    )


class TimedBackend:
    """Pieces that arrive at given times on a fake clock."""

    def __init__(self, timed_pieces, clock):
        self.timed_pieces, self.clock = timed_pieces, clock

    async def stream_reply(self, messages, params, notify=None, cache_scope=None):
        for at, piece in self.timed_pieces:
            self.clock[0] = at
            yield ReplyDelta(piece, tokens=1)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "timed_pieces, expected",
    [
        # first text at once; then at most one update per 50 ms; the rest when the reply ends
        ([(0, "a"), (0.01, "b"), (0.02, "c"), (0.06, "d"), (0.07, "e"), (0.2, "f")], ["a", "abcd", "abcdef"]),
        ([(5.0, "a"), (5.01, "b")], ["a", "ab"]),
        ([(0, ""), (0.01, "a"), (0.02, "b")], ["a", "ab"]),
    ],
)
async def test_fast_tokens_are_coalesced_into_screen_updates(encoder, monkeypatch, timed_pieces, expected):
    from orca_space import replies

    clock = [0.0]
    monkeypatch.setattr(replies, "monotonic", lambda: clock[0])
    service = make_service(encoder, TimedBackend(timed_pieces, clock), update_interval_s=0.05)
    assert await collect(service, service.prepare("hi", [], "", DEFAULTS)) == expected


class ScriptedBackend:
    """Replies with pieces, pauses (a float: seconds of silence) and a final error or hang."""

    def __init__(self, script):
        self.script, self.closed = script, asyncio.Event()

    async def stream_reply(self, messages, params, notify=None, cache_scope=None):
        try:
            for step in self.script:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                elif isinstance(step, Exception):
                    raise step
                elif step is None:
                    await asyncio.Event().wait()  # a server that stops sending
                else:
                    yield ReplyDelta(step, tokens=1)
        finally:
            self.closed.set()


async def timed_updates(service, chat):
    start, updates = asyncio.get_running_loop().time(), []
    async for reply in service.stream(chat):
        updates.append((round(asyncio.get_running_loop().time() - start, 2), reply.text))
    return updates


@pytest.mark.anyio
async def test_held_text_is_shown_when_the_source_goes_quiet(encoder):
    backend = ScriptedBackend(["Hello", " world", 2.0, "!"])
    service = make_service(encoder, backend, update_interval_s=0.05)
    updates = await timed_updates(service, service.prepare("hi", [], "", DEFAULTS))
    assert [text for _, text in updates] == ["Hello", "Hello world", "Hello world!"]
    assert updates[1][0] < 1.5, f"' world' waited for the next piece: {updates}"


@pytest.mark.anyio
async def test_held_text_is_shown_before_a_failure_is_reported(encoder):
    backend = ScriptedBackend(["The answer", " is 42.", EngineError("the server stopped")])
    service = make_service(encoder, backend, update_interval_s=10.0)
    shown = []
    with pytest.raises(EngineError, match="server stopped"):
        async for reply in service.stream(service.prepare("hi", [], "", DEFAULTS)):
            shown.append(reply.text)
    assert shown == ["The answer", "The answer is 42."]


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["close between updates", "cancel while waiting"])
async def test_stopping_the_stream_closes_the_backend(encoder, how):
    backend = ScriptedBackend(["Hello", None])
    service = make_service(encoder, backend, update_interval_s=0.05)
    updates = service.stream(service.prepare("hi", [], "", DEFAULTS))
    assert (await anext(updates)).text == "Hello"
    if how == "close between updates":
        await updates.aclose()
    else:  # what gradio does on stop: cancel the task that awaits the next update
        waiting = asyncio.ensure_future(anext(updates))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    await asyncio.wait_for(backend.closed.wait(), 1.0)


@pytest.fixture()
def local_service(tiny_model, tokenizer, encoder):
    engine = BatchedEngine(tiny_model, encoder.controls.stop_ids, context_length=1024)
    limits = ChatLimits(context_length=1024, update_interval_s=0)  # every token: the tiny model is fast
    service = ChatService(LocalBackend(engine, encoder, tokenizer), encoder, limits)
    yield service, engine
    engine.close()


@pytest.mark.anyio
async def test_local_backend_streams_detokenized_text(local_service, tokenizer):
    service, _ = local_service
    chat = service.prepare("Hello!", [], "sys", {**DEFAULTS, "max_new_tokens": 40})
    texts = await collect(service, chat)
    assert len(texts) > 5, "a streamed, multi-chunk reply"
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "streamed text only grows"
    assert "<|im_" not in texts[-1], "control tokens never show"


@pytest.mark.anyio
async def test_closing_the_stream_cancels_the_engine_request(local_service):
    """What gradio does on stop or a closed tab: close the async generator."""
    service, engine = local_service
    chat = service.prepare("Hello!", [], "", {**DEFAULTS, "max_new_tokens": 900, "temperature": 1.0})
    stream = service.stream(chat)
    await anext(stream)
    assert engine.stats().active == 1
    await stream.aclose()
    assert await asyncio.to_thread(wait_until_idle, engine, 2.0), "the engine is idle right after the close"


@pytest.mark.anyio
async def test_a_reply_cut_by_the_engine_closing_says_the_server_is_shutting_down(local_service):
    """Ctrl-C closes the engine under the replies it serves: each says why it ended (it ended
    silently, and the API's client read "ended without a finish reason")."""
    service, engine = local_service
    chat = service.prepare("Hello!", [], "", {**DEFAULTS, "max_new_tokens": 900, "temperature": 1.0})
    stream = service.stream(chat)
    await anext(stream)
    await asyncio.to_thread(engine.close)
    with pytest.raises(EngineError, match="the server is shutting down"):
        async for _ in stream:
            pass


@pytest.mark.anyio
async def test_engine_error_is_raised_as_engine_error(encoder, tokenizer):
    class BrokenEngine:
        context_length = 512

        def submit(self, prompt_ids, params, record_logits=False, cache_scope=None):
            from orca_space.engines.requests import RequestHandle

            handle = RequestHandle(prompt_ids, params)
            handle.finish("error", "the GPU ran out of memory")
            return handle

    service = ChatService(LocalBackend(BrokenEngine(), encoder, tokenizer), encoder, ChatLimits(512))
    with pytest.raises(EngineError, match="ran out of memory"):
        await collect(service, service.prepare("hi", [], "", DEFAULTS))


def test_unanswered_user_messages_are_left_out_of_the_prompt(encoder):
    """A message refused with an error stays on screen but must not reach the model."""
    history = [
        {"role": "user", "content": "refused " * 50},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "stopped before any token"},
    ]
    chat = make_service(encoder, max_message_chars=100).prepare("next", history, "", DEFAULTS)
    assert [m["content"] for m in chat.messages] == ["q1", "a1", "next"]


def test_long_replies_in_history_are_accepted(encoder):
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "long reply " * 50}]
    chat = make_service(encoder, max_message_chars=100, context_length=4096).prepare(
        "next", history, "", DEFAULTS
    )
    assert chat.messages[1]["role"] == "assistant", "a reply longer than the message limit is fine"


@pytest.mark.anyio
async def test_a_chat_waiting_for_a_slot_is_told_its_place(tiny_model, tokenizer, encoder):
    engine = BatchedEngine(tiny_model, encoder.controls.stop_ids, context_length=1024, slots=1)
    service = ChatService(LocalBackend(engine, encoder, tokenizer), encoder, ChatLimits(context_length=1024))
    try:
        busy = service.stream(service.prepare("first", [], "", {**DEFAULTS, "max_new_tokens": 900}))
        await anext(busy)  # the only slot is taken
        notices = []
        waiting = service.stream(
            service.prepare("second", [], "", {**DEFAULTS, "max_new_tokens": 2}), notices.append
        )
        first_piece = asyncio.ensure_future(anext(waiting))  # submits, then waits for a slot
        for _ in range(200):
            if notices:
                break
            await asyncio.sleep(0.01)
        assert len(notices) == 1 and "number 1 in line" in notices[0], notices
        assert not first_piece.done(), "nothing streams while the only slot is busy"
        await busy.aclose()  # frees the slot
        assert await asyncio.wait_for(first_piece, 10), "the waiting chat gets its reply"
    finally:
        engine.close()
