"""Tools and structured output through /v1, with the real clients: the `openai` SDK,
langchain-openai and pydantic-ai, against one live `python app.py` on the tiny checkpoint.

The tiny model's weights are random, so every valid call and every schema-valid JSON here is
the grammar's doing. Schemas bound their values (enums, ranges, short strings) so that a reply
always completes within its token limit.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from orca_space.web.api.tool_calls import MUST_CALL, assistant_text, tool_results_text
from tests.helpers import running_app

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The forecast.", "parameters": WEATHER_PARAMETERS},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLED = {"temperature": 1.0, "top_p": 1.0, "seed": 3, "max_tokens": 120, "extra_body": {"top_k": 40}}


@pytest.fixture(scope="module")
def app_url(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("tools") / "app.log"
    with running_app("--model", str(tiny_dir), "--rate-limit", "0", log_path=log) as url:
        yield url


@pytest.fixture(scope="module")
def model(tiny_dir):
    return str(tiny_dir)


@pytest.fixture(scope="module")
def client(app_url):
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0, timeout=120)


def check_call(call) -> None:
    """A call of one of TOOLS whose arguments match that tool's parameters."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        jsonschema.validate(arguments, WEATHER_PARAMETERS)
    else:
        assert call.function.name == "get_time" and arguments == {}


def streamed(client, model, **kwargs):
    """(content, {index: (id, name, arguments)}, finish_reason) from a streamed answer."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=model, stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:  # the first delta of a call: id, type and name
                    assert delta.index not in calls and delta.type == "function" and delta.function.name
                    calls[delta.index] = [delta.id, delta.function.name, delta.function.arguments or ""]
                else:
                    calls[delta.index][2] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


# -- the openai SDK -------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_is_a_valid_call(client, model, choice):
    answer = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, **SAMPLED
    )
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1, message
    for call in message.tool_calls:
        check_call(call)
    if isinstance(choice, dict):
        assert {call.function.name for call in message.tool_calls} == {"get_weather"}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_call_streams_as_tool_call_deltas(client, model, choice):
    kwargs = {**SAMPLED, "max_tokens": 400}  # parallel calls: as many as the model likes
    content, calls, finish = streamed(client, model, messages=ASK, tools=TOOLS, tool_choice=choice, **kwargs)
    assert finish == "tool_calls" and calls and not content.strip()
    assert sorted(calls) == list(range(len(calls))), "indexes count calls from 0"
    for id_, name, arguments in calls.values():
        assert id_.startswith("call_") and name in ("get_weather", "get_time")
        json.loads(arguments)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["none", "auto"])
def test_none_and_auto_let_the_model_write_text(client, model, choice, stream):
    """Random weights never happen to write `<tool_call>`: the reply is text, as without tools."""
    kwargs = dict(messages=ASK, tools=TOOLS, tool_choice=choice, **{**SAMPLED, "max_tokens": 12})
    if stream:
        content, calls, finish = streamed(client, model, **kwargs)
    else:
        answer = client.chat.completions.create(model=model, **kwargs)
        content, calls, finish = (
            answer.choices[0].message.content,
            answer.choices[0].message.tool_calls,
            answer.choices[0].finish_reason,
        )
    assert content and not calls and finish in ("stop", "length")


def test_a_full_tool_round_trip(client, model, encoder):
    first = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, **SAMPLED
    )
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump() for call in message.tool_calls],
        },
        *(
            {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'}
            for call in message.tool_calls
        ),
    ]
    second = client.chat.completions.create(
        model=model, messages=history, tools=TOOLS, tool_choice="auto", **{**SAMPLED, "max_tokens": 12}
    )
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    # The calls as written back and the results, re-encoded (the reply's own tokens may split
    # differently: random weights pick odd spellings of the same text).
    written = assistant_text("", [(c.function.name, c.function.arguments) for c in message.tool_calls])
    results = tool_results_text(['{"forecast": "sunny"}'] * len(message.tool_calls))
    added = len(encoder.encode_message("assistant", written)) + len(encoder.encode_message("user", results))
    assert second.usage.prompt_tokens >= first.usage.prompt_tokens + added - len(MUST_CALL) // 2, (
        "the calls and results are in the prompt (the first prompt's extra is its must-call line)"
    )


def test_structured_output_matches_its_schema(client, model):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": schema, "strict": True},
    }
    for stream in (False, True):
        if stream:
            chunks = client.chat.completions.create(
                model=model, messages=ASK, response_format=response_format, stream=True, **SAMPLED
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = client.chat.completions.create(
                model=model, messages=ASK, response_format=response_format, **SAMPLED
            )
            assert answer.choices[0].finish_reason == "stop"
            text = answer.choices[0].message.content
        jsonschema.validate(json.loads(text), schema)


def test_json_object_mode_writes_a_json_object(client, model):
    answer = client.chat.completions.create(
        model=model, messages=ASK, response_format={"type": "json_object"}, **{**SAMPLED, "max_tokens": 30}
    )
    text = answer.choices[0].message.content
    assert text.startswith("{"), "free JSON: an object from the first token"
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "fields, param, words",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format",
            "cannot be compiled",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not in tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
            "letters",
        ),
        (
            {"tools": TOOLS, "response_format": {"type": "json_object"}},
            "response_format",
            "cannot be combined",
        ),
    ],
)
def test_bad_tools_and_formats_are_named_400s(client, model, fields, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=ASK, **fields)
    error = caught.value.body
    assert error["param"] == param and words in error["message"]


def test_tools_that_fill_the_context_are_named_in_the_refusal(client, model):
    """A front end adds its tools to every chat without its user knowing: when the prompt no longer
    fits, the refusal says how much of it the tools take and to send fewer, and mentions no
    max_tokens the client never sent."""
    many = [
        {
            "type": "function",
            "function": {"name": f"tool_{i}", "description": f"Tool {i} " + "does it. " * 120},
        }
        for i in range(40)
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=ASK, tools=many)
    error = caught.value.body
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    tools_share = re.search(r"40 tools' descriptions take about ([\d,]+) of them", error["message"])
    assert tools_share and int(tools_share[1].replace(",", "")) > 8_192, error["message"]
    assert "fewer tools" in error["message"] and "max_tokens" not in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=ASK, tools=many, max_completion_tokens=9)
    assert "a lower max_completion_tokens" in caught.value.body["message"]
    # The same tools, with tool_choice none, stay out of the prompt: the chat is answered.
    answer = client.chat.completions.create(
        model=model, messages=ASK, tools=many, tool_choice="none", max_tokens=3
    )
    assert answer.choices[0].finish_reason == "length"


# -- langchain-openai -----------------------------------------------------------------------------


class Verdict(BaseModel):
    """A verdict on the question."""

    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=100)


def langchain_model(app_url, model):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=f"{app_url}/v1",
        api_key="unused",
        model=model,
        temperature=1.0,
        max_tokens=120,
        max_retries=0,
        seed=5,
        extra_body={"top_k": 40},
    )


def test_langchain_bind_tools_gets_valid_calls(app_url, model):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "Rome"], days: int = Field(ge=1, le=7)) -> str:
        """The forecast for a city."""
        return "sunny"

    bound = langchain_model(app_url, model).bind_tools([get_weather], tool_choice="get_weather")
    for message in (
        bound.invoke("Weather in Rome?"),
        functools.reduce(operator.add, bound.stream("Weather in Rome?")),
    ):
        assert message.tool_calls, "LangChain parsed the calls"
        for call in message.tool_calls:
            assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome")
            get_weather.args_schema.model_validate(call["args"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(app_url, model, method):
    structured = langchain_model(app_url, model).with_structured_output(Verdict, method=method)
    verdict = structured.invoke("Is the sky green? Answer as JSON with answer and confidence.")
    assert isinstance(verdict, Verdict)


# -- pydantic-ai ----------------------------------------------------------------------------------


def test_pydantic_ai_agent_with_a_tool_and_an_output_type(app_url, model):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    chat_model = OpenAIChatModel(model, provider=OpenAIProvider(base_url=f"{app_url}/v1", api_key="unused"))
    agent = Agent(
        chat_model, output_type=Verdict, model_settings={"temperature": 1.0, "max_tokens": 120, "seed": 9}
    )
    looked_up: list[str] = []

    @agent.tool_plain
    def look_up(topic: Literal["sky", "sea"]) -> str:
        """Look a topic up."""
        looked_up.append(topic)
        return f"the {topic} is blue"

    result = agent.run_sync("Is the sky green?")
    assert isinstance(result.output, Verdict)
    assert all(topic in ("sky", "sea") for topic in looked_up)
