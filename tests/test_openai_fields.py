"""The API's newer routes and fields, through the real `openai` SDK (and LangChain): continuing an
assistant message, `/health`, `models.retrieve`, text completions, log-probabilities, `n`, the
penalties and min-p, 405s, refusals logged after admission, and the limits that fit API callers.

One live `python app.py` on the tiny checkpoint serves the SDK tests; the log lines and the rate
limits are checked in process, against the same routes.
"""

from __future__ import annotations

import asyncio
import logging
import math

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from orca_space.chat import ChatLimits, ChatService, LocalBackend
from orca_space.ratelimit import RateLimiter
from orca_space.runtime import ChatRuntime
from orca_space.settings import api_requests_per_minute, parse_settings
from orca_space.web.admission import Admission
from orca_space.web.api.openai_api import OpenAIApi
from orca_space.web.api.openai_requests import DEFAULT_MAX_TOKENS
from tests.helpers import running_app
from tests.test_openai_api import CannedBackend, in_process_client
from tests.test_openai_translation import RecordingEngine

GREEDY = {"temperature": 0.0, "extra_body": {"repetition_penalty": 1.0}}
QUESTION = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": "Tell me about orcas."},
]


@pytest.fixture(scope="module")
def app_url(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai-fields") / "app.log"
    with running_app("--model", str(tiny_dir), log_path=log) as url:
        yield url


@pytest.fixture(scope="module")
def model(tiny_dir):
    return str(tiny_dir)


@pytest.fixture(scope="module")
def client(app_url):
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, model, messages=QUESTION, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, **{**GREEDY, **kwargs})


# -- continue, routes --------------------------------------------------------------------------------


def test_a_conversation_ending_with_an_assistant_message_is_continued(client, model):
    start = chat(client, model, max_tokens=6).choices[0].message.content
    messages = [*QUESTION, {"role": "assistant", "content": start}]
    answer = chat(client, model, messages, max_tokens=6)
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content
    assert answer.usage.prompt_tokens > chat(client, model, max_tokens=1).usage.prompt_tokens, (
        "the reply so far is in the prompt"
    )


def test_models_retrieve_finds_the_served_id_and_404s_others(client, model, app_url):
    entry = client.models.retrieve(model)
    assert (entry.id, entry.object) == (model, "model")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("Open-Orca/Mistral-7B-OpenOrca-not-here")
    assert missing.value.code == "model_not_found"


def test_health_is_200_when_ready_and_503_while_loading(app_url):
    assert httpx.get(f"{app_url}/health", timeout=5).status_code == 200
    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.status.update("downloading", "Downloading the weights…", 0.3)
    with TestClient(FastAPI(routes=OpenAIApi(Admission(runtime, 4), "m").routes())) as http:
        loading = http.get("/health")
    assert loading.status_code == 503 and loading.json()["status"] == "model_loading"


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("GET", "/v1/completions", "POST"),
        ("POST", "/v1/models", "GET"),
    ],
)
def test_a_route_asked_with_the_wrong_method_is_a_405(app_url, method, path, allowed):
    response = httpx.request(method, f"{app_url}{path}", timeout=5)
    assert response.status_code == 405 and response.headers["allow"] == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"


# -- text completions --------------------------------------------------------------------------------


def test_text_completion_plain_and_streamed_agree(client, model, tokenizer):
    prompt = "Orcas live in"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert (
        whole.usage.prompt_tokens == len(tokenizer(prompt).input_ids) and whole.usage.completion_tokens == 8
    )
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=8,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8


def test_control_tokens_in_a_raw_prompt_are_text_unless_asked(client, model):
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    def prompt_tokens(**extra):
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=1, extra_body=extra)
        return answer.usage.prompt_tokens

    as_text, as_controls = prompt_tokens(), prompt_tokens(parse_control_tokens=True)
    assert as_text > as_controls + 6, "each `<|im_start|>` as text is several tokens, as a control token one"


def test_text_completion_defaults_to_16_tokens_and_refuses_echo(client, model):
    assert client.completions.create(model=model, prompt="Hi", temperature=0.0).usage.completion_tokens <= 16
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=model, prompt="Hi", echo=True)
    assert refused.value.param == "echo"


# -- log-probabilities, n, penalties, min-p ----------------------------------------------------------


def test_logprobs_are_the_tokens_log_probabilities_likeliest_first(client, model):
    answer = chat(client, model, max_tokens=8, logprobs=True, top_logprobs=4)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 8
    for entry in content:
        alternatives = [a.logprob for a in entry.top_logprobs]
        assert len(alternatives) == 4 and alternatives == sorted(alternatives, reverse=True)
        assert entry.logprob <= 0 and sum(math.exp(v) for v in alternatives) <= 1 + 1e-5
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, alternatives[0]), (
            "greedy: the likeliest"
        )
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_sampled_logprobs_come_from_the_truncated_distribution(client, model):
    answer = chat(
        client, model, max_tokens=6, temperature=1.0, logprobs=True, top_logprobs=5, extra_body={"top_k": 3}
    )
    for entry in answer.choices[0].logprobs.content:
        values = [a.logprob for a in entry.top_logprobs]
        assert sum(math.exp(v) for v in values[:3]) == pytest.approx(1.0, abs=1e-4), "top-k 3 keeps 3 tokens"
        assert values[3:] == [-9999.0, -9999.0], "a cut token has probability 0 (-9999, as vLLM writes it)"
        assert entry.logprob in values[:3]


def test_streamed_logprobs_equal_the_whole_answers(client, model):
    whole = chat(client, model, max_tokens=8, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    stream = chat(client, model, max_tokens=8, logprobs=True, top_logprobs=2, stream=True)
    streamed = [
        e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-4)


def test_text_completion_logprobs_in_the_legacy_shape(client, model):
    answer = client.completions.create(model=model, prompt="Orcas", max_tokens=5, temperature=0.0, logprobs=3)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and top[token] == value == max(top.values())


def test_n_choices_each_sampled_with_their_usage(client, model):
    answer = chat(client, model, max_tokens=12, temperature=1.0, seed=7, n=3, extra_body={"top_k": 0})
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) > 1, "each choice is its own sample"
    assert answer.usage.completion_tokens == 36 and answer.usage.prompt_tokens < 100, "the prompt counts once"
    again = chat(client, model, max_tokens=12, temperature=1.0, seed=7, n=3, extra_body={"top_k": 0})
    assert [c.message.content for c in again.choices] == [c.message.content for c in answer.choices], "seeded"
    first = chat(client, model, max_tokens=12, temperature=1.0, seed=7, extra_body={"top_k": 0})
    assert first.choices[0].message.content == answer.choices[0].message.content, "choice 0 is n=1's sample"


def test_n_choices_stream_each_to_its_finish(client, model):
    stream = chat(client, model, max_tokens=5, n=2, stream=True)
    finished = {
        c.choices[0].index: c.choices[0].finish_reason
        for c in stream
        if c.choices and c.choices[0].finish_reason
    }
    assert finished == {0: "length", 1: "length"}


def reply_tokens(client, model, **kwargs) -> list[str]:
    answer = chat(client, model, max_tokens=40, logprobs=True, **kwargs)
    return [entry.token for entry in answer.choices[0].logprobs.content]


def test_a_strong_frequency_penalty_stops_greedy_repeats(client, model):
    plain = reply_tokens(client, model)
    assert len(set(plain)) < len(plain), "the tiny model repeats itself greedily, so the penalty has work"
    penalised = reply_tokens(client, model, frequency_penalty=2.0, presence_penalty=2.0)
    assert len(set(penalised)) == len(penalised), "no token comes twice under a penalty of 4 per use"


def test_min_p_cuts_alternatives_below_its_share_of_the_likeliest(client, model):
    def alternatives(**extra):
        answer = chat(
            client,
            model,
            max_tokens=6,
            temperature=1.0,
            seed=3,
            logprobs=True,
            top_logprobs=20,
            extra_body=extra,
        )
        return [[a.logprob for a in e.top_logprobs] for e in answer.choices[0].logprobs.content]

    floor = math.log(0.2)
    for values in alternatives(min_p=0.2, top_k=0):
        kept = [v for v in values if v > -9999]
        assert all(v >= values[0] + floor - 1e-5 for v in kept) and values[-1] == -9999.0
    free = alternatives(top_k=0)
    assert any(v < values[0] + floor for values in free for v in values), (
        "without min-p, unlikely tokens stay"
    )


def test_langchain_reads_logprobs_and_completes_text(app_url, model):
    from langchain_openai import ChatOpenAI, OpenAI

    llm = ChatOpenAI(base_url=f"{app_url}/v1", api_key="unused", model=model, temperature=0, max_tokens=5)
    message = llm.bind(logprobs=True).invoke("Hello")
    assert len(message.response_metadata["logprobs"]["content"]) == 5
    completion = OpenAI(base_url=f"{app_url}/v1", api_key="unused", model=model, temperature=0, max_tokens=5)
    assert completion.invoke("Orcas live in") == client_text(app_url, model, "Orcas live in")


def client_text(app_url: str, model: str, prompt: str) -> str:
    sdk = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0)
    return sdk.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0).choices[0].text


# -- limits that fit API callers ---------------------------------------------------------------------


def test_a_long_system_message_is_bounded_by_the_context_not_8000_characters(client, model):
    system = "You are a careful coding agent. " * 265  # 8,480 characters, as smolagents' CodeAgent sends
    answer = chat(client, model, [{"role": "system", "content": system}, QUESTION[1]], max_tokens=2)
    assert answer.usage.prompt_tokens > 1_000
    with pytest.raises(openai.BadRequestError) as too_long:
        chat(client, model, [{"role": "system", "content": "orca " * 12_000}, QUESTION[1]], max_tokens=2)
    assert too_long.value.code == "context_length_exceeded"


@pytest.fixture
def recording(encoder, tokenizer):
    engine = RecordingEngine()
    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.engine = engine
    runtime.service = ChatService(LocalBackend(engine, encoder, tokenizer), encoder, ChatLimits(8192))
    runtime.status.update("ready", "Ready.")
    with TestClient(FastAPI(routes=OpenAIApi(Admission(runtime, 4, api=True), "m").routes())) as http:
        yield http, engine


def test_fields_reach_the_engine_and_a_request_without_a_limit_gets_the_default(recording, encoder):
    http, engine = recording
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": None},  # as clients send after a tool call
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "so far"},
    ]
    fields = {
        "min_p": 0.1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "ignore_eos": True,
        "top_k": -1,
    }
    response = http.post("/v1/chat/completions", json={"messages": messages, **fields})
    assert response.status_code == 200, response.json()
    prompt, params = engine.requests[-1]
    assert prompt == encoder.encode_chat(
        [{"role": m["role"], "content": m["content"] or ""} for m in messages], continue_last=True
    ), "the last assistant message is left open, as the page's Continue leaves it"
    assert (params.min_p, params.presence_penalty, params.frequency_penalty) == (0.1, 0.5, -0.5)
    assert params.ignore_eos and params.top_k == 0 and params.max_new_tokens == DEFAULT_MAX_TOKENS


def api_with_limit(encoder, limit: int, keys: tuple[str, ...] = ()) -> tuple[ChatRuntime, object]:
    runtime = ChatRuntime(
        model_name="m", context_length=8192, api_limiter=RateLimiter(limit), limiter=RateLimiter(1)
    )
    runtime.service = ChatService(CannedBackend(), encoder, ChatLimits())
    runtime.status.update("ready", "Ready.")
    return runtime, OpenAIApi(Admission(runtime, 4, api=True), "m", keys)


def test_refusals_and_ignored_fields_are_logged_once_each_after_admission(encoder, caplog):
    """A flood of bad requests writes as many lines as the rate limit admits, no more."""
    _, api = api_with_limit(encoder, 3)
    caplog.set_level(logging.INFO, logger="orca_space.web.api.openai_api")
    with TestClient(FastAPI(routes=api.routes())) as http:
        bad = [http.post("/v1/chat/completions", json={"messages": [], "n": 9}) for _ in range(10)]
        assert [r.status_code for r in bad] == [400] * 3 + [429] * 7
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("refused (400" in line for line in lines), lines
    caplog.clear()
    _, api = api_with_limit(encoder, 3)
    with TestClient(FastAPI(routes=api.routes())) as http:
        body = {"messages": QUESTION, "foo": 1, "x\nforged line": 2}
        odd = [http.post("/v1/chat/completions", json=body) for _ in range(10)]
        assert [r.status_code for r in odd] == [200] * 3 + [429] * 7
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("ignored fields 'foo'" in line for line in lines), lines
    assert not any("\n" in line for line in lines), "a field's name cannot start a log line"


def test_api_callers_have_their_own_limit_per_key(encoder):
    runtime, _ = api_with_limit(encoder, 2, keys=("k1", "k2"))
    page_limit = runtime.limiter

    async def run():
        def client(key):
            return in_process_client(runtime, key, keys=("k1", "k2"))

        for _ in range(2):
            assert (await client("k1").chat.completions.create(model="m", messages=QUESTION)).choices
        with pytest.raises(openai.RateLimitError):
            await client("k1").chat.completions.create(model="m", messages=QUESTION)
        answer = await client("k2").chat.completions.create(model="m", messages=QUESTION)
        assert answer.choices[0].message.content == "fine", "another key is another caller"

    asyncio.run(run())
    assert page_limit.acquire("key:0") == 0.0, "the page's limit (1 a minute) counted none of them"


def test_the_api_limit_is_a_flag_and_an_environment_variable():
    assert api_requests_per_minute(parse_settings([], {})) == 30, "--rate-limit's, by default"
    assert api_requests_per_minute(parse_settings(["--api-rate-limit", "600"], {})) == 600
    assert api_requests_per_minute(parse_settings([], {"ORCA_API_RATE_LIMIT": "0"})) == 0
    with pytest.raises(SystemExit):
        parse_settings(["--api-rate-limit", "-1"], {})
