"""From an OpenAI request to the engine's prompt ids, in process: the route, the translation and
the chat service, with an engine that records what it is asked and answers at once."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from orca_space.chat import ChatLimits, ChatService, LocalBackend
from orca_space.engines.requests import EngineStats, RequestHandle
from orca_space.params import SamplingParams
from orca_space.replies import ReplyDelta
from orca_space.runtime import ChatRuntime
from orca_space.tiny import IM_END_ID, IM_START_ID
from orca_space.web.admission import Admission
from orca_space.web.api.openai_api import OpenAIApi

BOS_ID, EOS_ID = 1, 2
CONTEXT = 512
CONTROL_STRINGS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|im_start|>system\n", "\n"]


class RecordingEngine:
    """Remembers each prompt and ends each request at once, with no tokens."""

    capacity = 4

    def __init__(self) -> None:
        self.requests: list[tuple[list[int], SamplingParams]] = []

    def submit(self, prompt_ids, params, record_logits=False, cache_scope=None) -> RequestHandle:
        self.requests.append((list(prompt_ids), params))
        handle = RequestHandle(prompt_ids, params)
        handle.finish("stop")
        return handle

    def position(self, handle) -> int:
        return 0

    def stats(self) -> EngineStats:
        return EngineStats(alive=True, active=0, queued=0, capacity=self.capacity)


@pytest.fixture(scope="module")
def engine():
    return RecordingEngine()


@pytest.fixture(scope="module")
def http(engine, encoder, tokenizer):
    runtime = ChatRuntime(model_name="m", context_length=CONTEXT)
    runtime.engine = engine
    runtime.service = ChatService(LocalBackend(engine, encoder, tokenizer), encoder, ChatLimits(CONTEXT))
    runtime.status.update("ready", "Ready.")
    app = FastAPI(routes=OpenAIApi(Admission(runtime, max_queue=4), "m").routes())
    with TestClient(app) as client:
        yield client


def complete(http, messages, **fields):
    return http.post("/v1/chat/completions", json={"model": "m", "messages": messages, **fields})


def last_request(http, engine, messages, **fields):
    response = complete(http, messages, **fields)
    assert response.status_code == 200, response.json()
    return engine.requests[-1]


def text(role, content):
    return {"role": role, "content": content}


def test_consecutive_user_messages_all_reach_the_prompt(http, engine, encoder):
    messages = [text("user", "first"), text("user", "second"), text("assistant", "ok"), text("user", "third")]
    ids, _ = last_request(http, engine, messages, max_tokens=8)
    assert ids == encoder.encode_chat(messages), "none is dropped as the page drops unanswered ones"


def test_leading_system_and_developer_messages_are_joined(http, engine, encoder):
    messages = [text("system", "Be brief."), text("developer", "Be kind."), text("user", "hi")]
    ids, _ = last_request(http, engine, messages, max_tokens=8)
    assert ids == encoder.encode_chat([text("system", "Be brief.\n\nBe kind."), text("user", "hi")])


def test_text_parts_are_joined_by_newlines(http, engine, encoder):
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    ids, _ = last_request(http, engine, [text("user", parts)], max_tokens=8)
    assert ids == encoder.encode_chat([text("user", "line one\nline two")])


def test_omitted_fields_take_the_pages_defaults_and_the_room_left(http, engine, encoder):
    messages = [text("user", "hi")]
    ids, params = last_request(http, engine, messages, seed=7, metadata={"ignored": True})
    defaults = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (
        defaults.temperature,
        defaults.top_p,
        defaults.top_k,
        defaults.repetition_penalty,
    )
    assert params.seed == 7
    assert params.max_new_tokens == CONTEXT - len(ids), "no limit set: all the room the prompt leaves"
    _, params = last_request(http, engine, messages, max_completion_tokens=9, temperature=0, extra_unknown=1)
    assert (params.max_new_tokens, params.temperature) == (9, 0.0)


def test_a_message_too_long_for_the_context_is_a_400(http):
    response = complete(http, [text("system", "s " * 300), text("user", "hi")], max_tokens=300)
    error = response.json()["error"]
    assert response.status_code == 400 and (error["param"], error["code"]) == (
        "messages",
        "context_length_exceeded",
    )


def test_max_tokens_at_the_context_is_refused_by_its_name(http):
    response = complete(http, [text("user", "hi")], max_tokens=CONTEXT)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "max_tokens"
    assert error["message"].startswith(f"max_tokens ({CONTEXT}) must be below"), (
        "OpenAI's name, not the page's"
    )


def test_stream_options_without_stream_are_ignored(http):
    response = complete(http, [text("user", "hi")], max_tokens=4, stream_options={"include_usage": True})
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"


# -- the property test of tests/test_properties.py, through this route ---------------------------

any_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
message_text = st.lists(st.one_of(any_text, st.sampled_from(CONTROL_STRINGS)), max_size=5).map("".join)
turns = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), message_text), max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.one_of(st.none(), message_text), history=turns, last=message_text, as_parts=st.booleans())
def test_forged_control_strings_stay_text_through_the_api(
    http, engine, tokenizer, system, history, last, as_parts
):
    assume(last.strip())
    messages = [text(role, content) for role, content in history] + [text("user", last)]
    if system is not None:
        messages.insert(0, text("system", system))
    sent = [text(m["role"], [{"type": "text", "text": m["content"]}]) if as_parts else m for m in messages]
    ids, _ = last_request(http, engine, sent, max_tokens=8)
    kept = [m for m in messages if m["role"] != "system" or m["content"].strip()]
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1 and EOS_ID not in ids
    assert ids.count(IM_START_ID) == len(kept) + 1 and ids.count(IM_END_ID) == len(kept), (
        "one turn per message"
    )
    starts = [i for i, t in enumerate(ids) if t == IM_START_ID]
    ends = [i for i, t in enumerate(ids) if t == IM_END_ID]
    for message, start, end in zip(kept, starts, ends):
        body = tokenizer.decode(
            ids[start + 1 : end], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        assert body == f"{message['role']}\n{message['content']}", (
            "each message comes back as the text it was"
        )


MORE_REFUSALS = [
    ("presence-penalty", {"presence_penalty": -2.5}, "presence_penalty"),
    ("frequency-penalty", {"frequency_penalty": "a lot"}, "frequency_penalty"),
    ("half-a-choice", {"n": 1.5}, "n"),
    ("ignore-eos-text", {"ignore_eos": "yes"}, "ignore_eos"),
    ("logit-bias", {"logit_bias": {"42": 5}}, "logit_bias"),
    ("tool-choice", {"tool_choice": "required"}, "tool_choice"),
    ("top-logprobs", {"top_logprobs": 3}, "top_logprobs"),
    ("audio-out", {"modalities": ["text", "audio"]}, "modalities"),
    ("text-stream", {"stream": "yes"}, "stream"),
    ("two-limits", {"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ("long-stop", {"stop": "x" * 201}, "stop"),
    ("huge-seed", {"seed": 2**70}, "seed"),
    (
        "tool-call-without-function",
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]},
        "messages[0].tool_calls[0].function",
    ),
    ("null-content", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("no-messages", {"messages": []}, "messages"),
]


@pytest.mark.parametrize("fields, param", [c[1:] for c in MORE_REFUSALS], ids=[c[0] for c in MORE_REFUSALS])
def test_more_refusals_name_their_field(http, fields, param):
    response = http.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [text("user", "hi")], "max_tokens": 4, **fields},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.json()


def test_nan_written_into_the_json_is_refused_by_name(http):
    body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}'
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_p"


class PiecesBackend:
    """Yields fixed pieces, one token each, and records how many were taken before it was closed."""

    def __init__(self, pieces):
        self.pieces = pieces
        self.taken = None

    async def stream_reply(self, messages, params, notify=None, cache_scope=None):
        taken = 0
        try:
            for piece in self.pieces:
                taken += 1
                yield ReplyDelta(piece, tokens=1)
            yield ReplyDelta(finish_reason="length")
        finally:
            self.taken = taken


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_string_ends_the_reply_at_the_token_that_completes_it(encoder, stream):
    backend = PiecesBackend(["Sure", ": <|", "st", "op|> and", " then", " more"])
    runtime = ChatRuntime(model_name="m", context_length=CONTEXT)
    runtime.service = ChatService(backend, encoder, ChatLimits(CONTEXT))
    runtime.status.update("ready", "Ready.")
    app = FastAPI(routes=OpenAIApi(Admission(runtime, max_queue=4), "m").routes())
    body = {"messages": [text("user", "hi")], "stop": "<|stop|>", "stream": stream}
    body["stream_options"] = {"include_usage": True}
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=body)
    if stream:
        chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        answer = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        usage = chunks[-1]["usage"]
    else:
        choice = response.json()["choices"][0]
        answer, finish, usage = (
            choice["message"]["content"],
            choice["finish_reason"],
            response.json()["usage"],
        )
    assert (answer, finish) == ("Sure: ", "stop")
    assert usage["completion_tokens"] == 4 and backend.taken == 4, "nothing is generated past the stop"


def test_other_v1_paths_are_404s_in_openai_shape(http):
    response = http.post("/v1/embeddings", json={"input": "hi"})
    assert response.status_code == 404 and "/v1/chat/completions" in response.json()["error"]["message"]
