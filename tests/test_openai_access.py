"""Who may use /v1 and MCP: the access gate alone, then a live app with a login, keys and MCP."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from orca_space.web.access import API_OFF, AccessGate, is_guarded, matching_key
from tests.helpers import running_app

KEYS = ("k1", "k2")


@pytest.mark.parametrize(
    "path, guarded",
    [
        ("/v1", True),
        ("/v1/chat/completions", True),
        ("/gradio_api/mcp/", True),
        ("/gradio_api/mcp/sse", True),
        ("/metrics", True),
        ("/v1beta/x", False),
        ("/gradio_api/mcpx", False),
        ("/healthz", False),
        ("/", False),
    ],
)
def test_guarded_paths(path, guarded):
    assert is_guarded(path) is guarded


def test_keys_match_exactly_and_only_as_bearer_tokens():
    assert matching_key("Bearer k2", KEYS) == 1 and matching_key("bearer  k1 ", KEYS) == 0
    for header in (None, "", "Bearer", "Bearer k", "Bearer k1x", "Basic k1", "k1"):
        assert matching_key(header, KEYS) is None, header


def test_what_the_gate_refuses():
    assert AccessGate(None, KEYS, login_required=True).refusal("Bearer k1") is None
    assert AccessGate(None, KEYS, login_required=False).refusal(None)[0] == 401, "keys given: always needed"
    assert AccessGate(None, KEYS, login_required=True).refusal("Bearer nope")[0] == 401
    assert AccessGate(None, (), login_required=True).refusal("Bearer k1") == (
        403,
        "permission_error",
        API_OFF,
    )
    assert AccessGate(None, (), login_required=False).refusal(None) is None, "no login, no keys: open"


def test_metrics_are_guarded_like_the_api():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    inner = Starlette(routes=[Route("/metrics", lambda request: PlainTextResponse("up 1\n"))])

    async def status(keys, login_required, headers=None):
        transport = httpx.ASGITransport(app=AccessGate(inner, keys, login_required))
        async with httpx.AsyncClient(transport=transport, base_url="http://space") as http:
            return (await http.get("/metrics", headers=headers or {})).status_code

    assert asyncio.run(status((), True)) == 403, "behind a login without access keys: off"
    assert asyncio.run(status(KEYS, True)) == 401
    assert asyncio.run(status(KEYS, False, {"authorization": "Bearer k2"})) == 200
    assert asyncio.run(status((), False)) == 200, "no login, no keys: as open as the page"


# -- live: --auth, --access-key k1,k2, --mcp --------------------------------------------------------


@pytest.fixture(scope="module")
def app_url(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("access") / "app.log"
    args = ("--model", str(tiny_dir), "--auth", "user:pw", "--access-key", ",".join(KEYS), "--mcp")
    with running_app(*args, log_path=log) as url:
        yield url


def sdk(app_url, key):
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}], ids=["no-key", "wrong-key"])
def test_without_the_right_key_the_api_is_closed(app_url, tiny_dir, headers):
    body = {"model": str(tiny_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for method, path, json in [("POST", "/v1/chat/completions", body), ("GET", "/v1/models", None)]:
        response = httpx.request(method, f"{app_url}{path}", json=json, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{app_url}/gradio_api/mcp/", headers=headers).status_code == 401, "MCP is closed too"
    assert httpx.get(f"{app_url}/metrics", headers=headers).status_code == 401, "and the metrics"


def test_the_sdk_reports_a_wrong_key(app_url, tiny_dir):
    with pytest.raises(openai.AuthenticationError):
        sdk(app_url, "wrong").models.list()


def test_the_right_key_works(app_url, tiny_dir):
    request = {"model": str(tiny_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    answer = sdk(app_url, KEYS[1]).chat.completions.create(**request)
    assert answer.choices[0].message.content and answer.usage.completion_tokens >= 1
    assert [m.id for m in sdk(app_url, KEYS[0]).models.list().data] == [str(tiny_dir)]
    metrics = httpx.get(f"{app_url}/metrics", headers={"authorization": f"Bearer {KEYS[0]}"})
    assert metrics.status_code == 200 and "orca_space_prompt_tokens_reused_total" in metrics.text


def test_the_tools_gradio_endpoint_is_behind_the_login_too(app_url):
    response = httpx.post(
        f"{app_url}/gradio_api/run/ask", json={"data": ["hi"]}, headers={"authorization": "Bearer k1"}
    )
    assert response.status_code == 401, "an access key is not a gradio login"


def mcp_session(app_url, key, work):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async def run():
        headers = {"Authorization": f"Bearer {key}"}
        async with streamablehttp_client(f"{app_url}/gradio_api/mcp/", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

    return asyncio.run(run())


def test_mcp_lists_one_tool_and_answers_with_it(app_url):
    async def work(session):
        tools = (await session.list_tools()).tools
        answer = await session.call_tool(
            tools[0].name, {"message": "Hello", "max_new_tokens": 8, "temperature": 0}
        )
        refused = await session.call_tool(tools[0].name, {"message": "Hello", "temperature": 7})
        return tools, answer, refused

    tools, answer, refused = mcp_session(app_url, KEYS[0], work)
    assert [tool.name for tool in tools] == ["ask_mistral_orca"], (
        "only the documented tool, not the page's /chat"
    )
    assert set(tools[0].inputSchema["properties"]) == {
        "message",
        "system_message",
        "max_new_tokens",
        "temperature",
    }
    assert "MistralOrca" in tools[0].description
    assert not answer.isError and answer.content[0].text, "the tool answers whole"
    assert refused.isError and "temperature must be in [0, 2]" in refused.content[0].text
