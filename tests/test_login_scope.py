"""Behind `--auth`: what another web site, and another person with the same login, can do
(issue #27, items 3, 4 and 9).

`--auth` is one `user:password` that everyone with the password shares, and its cookie is
`SameSite=None`. The app runs here as on a server addressed by name (`Host: space.example`, not
localhost, where gradio's CORS is lax), behind one trusted proxy (`--trusted-proxy-hops 1`, so an
X-Forwarded-For address is a person), and each test attacks as that party would:
- a page on https://evil.example, in a logged-in visitor's browser, may not read an answer
  (the preflight, the POST and the answer's GET all carry the cookie);
- a second person logged in with the same account neither starts from the first one's kept KV
  cache (the timing side channel private mode closes) nor spends the first one's rate limit;
- FastAPI's own /openapi.json (and /docs, /redoc) are not served without the login;
- a client with an access key sends what JSON can spell but Python cannot take (half of a UTF-16
  surrogate pair, an integer of 4,301+ digits) to /v1 and the MCP tool: a named refusal each
  (tests/test_security.py does the same to the page's routes).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import chat_and_sync_ids, running_app

HOST = "space.example"
EVIL = "https://evil.example"
KEY = "k-login-scope"
RATE = 3  # messages a minute per address
GREEDY = [8, 0.0, 0.95, 40, 1.0]


@pytest.fixture(scope="module")
def app_url(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("login-scope") / "app.log"
    args = ("--model", str(tiny_dir), "--auth", "user:pw", "--access-key", KEY)
    args += ("--trusted-proxy-hops", "1", "--rate-limit", str(RATE), "--mcp")
    with running_app(*args, log_path=log) as url:
        yield url


@contextlib.contextmanager
def logged_in(app_url: str) -> Iterator[httpx.Client]:
    """A person's browser: its own login to the shared account, addressed as the Space is."""
    with httpx.Client(base_url=app_url, timeout=60, headers={"host": HOST}) as http:
        answer = http.post("/login", data={"username": "user", "password": "pw"})
        assert answer.status_code == 200 and http.cookies, answer.text
        yield http


@pytest.fixture(scope="module")
def chat_id(app_url):
    with logged_in(app_url) as http:
        return chat_and_sync_ids(http)["chat"]


def chat_in_session(http: httpx.Client, chat_id: int, session: str, message: str, address: str) -> dict:
    """One message through the page's /chat event in `session`, from `address`; the last event."""
    headers = {"x-forwarded-for": address}
    body = {"data": [message, None, "You are a test.", *GREEDY], "fn_index": chat_id, "session_hash": session}
    joined = http.post("/gradio_api/queue/join", json=body, headers=headers)
    assert joined.status_code == 200, joined.text
    end = time.monotonic() + 60
    with http.stream(
        "GET", "/gradio_api/queue/data", params={"session_hash": session}, headers=headers
    ) as stream:
        for line in stream.iter_lines():
            assert time.monotonic() < end, "no answer in time"
            if line.startswith("data:") and (event := json.loads(line[5:])).get("msg") == "process_completed":
                return event
    raise AssertionError("the stream ended without process_completed")


def metric_with_key(app_url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{app_url}/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "orca_space_prompt_tokens_reused_total":
                return sample.value
    raise AssertionError("no reuse counter in /metrics")


# -- item 3: CORS --------------------------------------------------------------------------------


def assert_not_readable_by(response: httpx.Response, origin: str) -> None:
    allowed = response.headers.get("access-control-allow-origin")
    credentials = response.headers.get("access-control-allow-credentials")
    assert allowed not in (origin, "*") and credentials != "true", (
        f"{origin} may read this with the login: {allowed=} {credentials=}"
    )


def test_another_site_cannot_read_a_logged_in_visitors_answers(app_url):
    with logged_in(app_url) as http:
        cross = {"origin": EVIL}
        preflight = http.options(
            "/gradio_api/call/chat",
            headers={
                **cross,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert_not_readable_by(preflight, EVIL)
        posted = http.post(
            "/gradio_api/call/chat", json={"data": ["hi", "You are a test.", *GREEDY]}, headers=cross
        )
        assert_not_readable_by(posted, EVIL)
        if posted.status_code == 200:
            answer = http.get(f"/gradio_api/call/chat/{posted.json()['event_id']}", headers=cross)
            assert_not_readable_by(answer, EVIL)
        for path in ("/config", "/gradio_api/info"):
            assert_not_readable_by(http.get(path, headers=cross), EVIL)


def test_the_apps_own_origin_keeps_working(app_url):
    with logged_in(app_url) as http:
        own = f"https://{HOST}"
        preflight = http.options(
            "/gradio_api/call/chat", headers={"origin": own, "access-control-request-method": "POST"}
        )
        assert preflight.headers.get("access-control-allow-origin") == own
        config = http.get("/config", headers={"origin": own})
        assert config.status_code == 200 and config.headers.get("access-control-allow-origin") == own


# -- item 4: one login, several people -------------------------------------------------------------


def test_one_logins_people_do_not_share_kept_caches(app_url, chat_id):
    question = "Tell me everything about " + " and ".join(f"topic {i}" for i in range(60))
    with logged_in(app_url) as alice, logged_in(app_url) as bob:
        alice_session = f"alice-{secrets.token_hex(4)}"
        assert chat_in_session(alice, chat_id, alice_session, question, "10.9.0.1")["success"]
        before = metric_with_key(app_url)
        assert chat_in_session(bob, chat_id, f"bob-{secrets.token_hex(4)}", question, "10.9.0.2")["success"]
        assert metric_with_key(app_url) == before, "bob's guess started from alice's kept cache"
        assert chat_in_session(alice, chat_id, alice_session, "And then?", "10.9.0.1")["success"]
        assert metric_with_key(app_url) > before, "alice's own next turn starts from her cache"


def test_one_logins_people_have_their_own_rate_limits(app_url, chat_id):
    with logged_in(app_url) as alice, logged_in(app_url) as bob:
        session = f"alice-rate-{secrets.token_hex(4)}"
        results = [chat_in_session(alice, chat_id, session, "hi", "10.8.0.1") for _ in range(RATE + 1)]
        assert [r["success"] for r in results] == [True] * RATE + [False], "alice is held to the limit"
        assert "Too many messages" in str(results[-1]["output"])
        answer = chat_in_session(bob, chat_id, f"bob-rate-{secrets.token_hex(4)}", "hi", "10.8.0.2")
        assert answer["success"], f"bob, the same login elsewhere, must not be refused: {answer['output']}"


# -- item 9: the schema behind the login ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/gradio_api/openapi.json"])
def test_the_api_schema_needs_the_login(app_url, path):
    answer = httpx.get(f"{app_url}{path}", headers={"host": HOST})
    assert answer.status_code in (401, 403, 404), f"{path} answered {answer.status_code} without the login"
    assert "/gradio_api/queue/join" not in answer.text and "openapi" not in answer.text.lower()


# -- item 6: what JSON can spell and Python cannot take, through /v1 and MCP -----------------------

LONE_SURROGATE = '"a\\ud800b"'  # JSON text for "a", half a UTF-16 pair, "b"
OVERLONG = "1" + "0" * 4400


def v1(app_url: str, body: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    return httpx.post(f"{app_url}/v1/chat/completions", content=body, headers=headers, timeout=60)


def test_v1_names_a_lone_surrogate_and_an_overlong_integer(app_url):
    surrogate = v1(
        app_url, '{"messages": [{"role": "user", "content": %s}], "max_tokens": 4}' % LONE_SURROGATE
    )
    assert surrogate.status_code == 400, surrogate.text[:300]
    error = surrogate.json()["error"]
    assert error["param"] == "messages[0].content" and "lone UTF-16 surrogate" in error["message"], error
    overlong = v1(app_url, '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}' % OVERLONG)
    assert overlong.status_code == 400 and "integer of 4,401 digits" in overlong.json()["error"]["message"]


def mcp_raw(app_url: str, calls: list[str]) -> list[httpx.Response]:
    """JSON-RPC bodies written by hand, as an attacker sends them (the MCP SDK cannot encode a lone
    surrogate), after the protocol's greeting; one answer per call."""
    url = f"{app_url}/gradio_api/mcp/"
    headers = {
        "authorization": f"Bearer {KEY}",
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
    }
    hello = {
        "protocolVersion": "2025-03-26",
        "capabilities": {},
        "clientInfo": {"name": "attacker", "version": "1"},
    }
    with httpx.Client(timeout=60, headers=headers) as http:
        greeting = http.post(url, json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello})
        assert greeting.status_code == 200, greeting.text[:200]
        if session := greeting.headers.get("mcp-session-id"):
            http.headers["mcp-session-id"] = session
        http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        return [http.post(url, content=call) for call in calls]


def tool_call(arguments: str) -> str:
    return (
        '{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "%s", "arguments": %s}}'
        % (
            "ask_mistral_orca",
            arguments,
        )
    )


def test_the_mcp_tool_names_a_lone_surrogate_and_an_overlong_integer(app_url):
    surrogate, overlong = mcp_raw(
        app_url,
        [
            tool_call('{"message": %s, "max_new_tokens": 4}' % LONE_SURROGATE),
            tool_call('{"message": "hi", "max_new_tokens": %s}' % OVERLONG),
        ],
    )
    assert surrogate.status_code == 200 and '"isError":true' in surrogate.text.replace(" ", "")
    assert "lone UTF-16 surrogate" in surrogate.text, surrogate.text[:300]
    assert overlong.status_code == 400 and "integer of 4,401 digits" in overlong.text, overlong.text[:300]
