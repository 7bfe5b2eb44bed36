"""Long conversations as people have them: past the context, through the page, `/chat` and `/v1`,
several at once.

721 tests once proved one feature each, and none held a conversation past the context: the page
then stopped answering, in silence (issue #21). Here one in-process app at a small context (1,200
tokens, so that turns are left out from the third message on) serves a long page session with
every feature used on the way, the API checks and a crowd of concurrent sessions, whose gradio
states are checked afterwards; a second app, at the default context, holds 30 turns of `/chat`.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio import utils as gradio_utils
from gradio_client import Client
from playwright.sync_api import expect

from orca_space.chat import DEFAULT_SYSTEM_MESSAGE
from orca_space.web.page import chat_hooks
from orca_space.web.page.page_state import is_plain_data, session_states
from tests.browser_flow import (
    BOT_MESSAGES,
    CHAT_TEXTBOX,
    REPLY_STATS,
    USER_MESSAGES,
    VIEWPORT,
    close_settings,
    open_settings,
    require_chromium,
    send,
    set_max_new_tokens,
    set_slider,
)
from tests.helpers import API_ORDER, another_origin, metric, page_in_process
from tests.page_flow import (
    CONTINUE,
    EXPORT_PANEL,
    PROMPT_PANEL,
    chat_and_wait,
    click_last,
    edit_last_message,
    exported,
    last_stats,
    open_page,
    open_panel,
    retry_last,
    wait_until_settled,
)

CONTEXT = 1200
NEW_TOKENS = 24
# About 10 tokens; 45 of them make a message of about 450 tokens, so that at a 1,200-token
# context two turns fit and the third message leaves the oldest out.
WORDS = "orcas surf the long waves of the northern sea "
PAGE_SETTINGS = dict(max_new_tokens=NEW_TOKENS, temperature=0.0, top_p=0.95, top_k=40, repetition_penalty=1.1)
LEFT_OUT = re.compile(r"Left out to fit, oldest first \(\d+ turns?\)")

pytestmark = pytest.mark.browser


def long_message(label: str, repeats: int = 45) -> str:
    return f"Message {label}: " + WORDS * repeats


@pytest.fixture(scope="module")
def short_app(tiny_dir):
    require_chromium()
    with page_in_process("--model", str(tiny_dir), "--context-length", str(CONTEXT)) as app:
        yield app


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    context.close()


def greedy_page(page, url: str) -> None:
    open_page(page, url, timeout_s=60)
    open_settings(page)
    set_slider(page, "Temperature", 0)
    set_max_new_tokens(page, NEW_TOKENS)
    close_settings(page)


def assert_every_message_answered(page) -> None:
    users, bots = page.locator(USER_MESSAGES).count(), page.locator(BOT_MESSAGES).count()
    assert users == bots, f"{users} messages, {bots} replies: a message went unanswered"
    notes = " | ".join(page.locator(REPLY_STATS).all_inner_texts())
    assert "ended by an error" not in notes, notes


@pytest.fixture()
def picture_host():
    """Another server that counts what the page fetches from it (a message names its pictures)."""
    with another_origin() as (base, hits):
        yield base, hits


def test_a_page_conversation_past_the_context_keeps_answering_with_every_feature(
    short_app, page, tmp_path, picture_host
):
    url, _, _ = short_app
    host, fetched = picture_host
    greedy_page(page, url)
    open_panel(page, PROMPT_PANEL)  # open all along: it follows every reply
    panel = page.locator("#prompt-summary")

    # 1) Six long turns: from the third on, the oldest are left out, and each is answered.
    reused_before = metric(url, "orca_space_prompt_tokens_reused_total")
    for n in range(1, 7):
        # Turn 2 names pictures on another server: kept to the app, never fetched (media_policy.py).
        pictures = f' <img src="{host}/typed.png"> ![md]({host}/md.png)' if n == 2 else ""
        chat_and_wait(page, long_message(str(n)) + pictures)
        expect(page.locator(BOT_MESSAGES)).to_have_count(n)
        assert_every_message_answered(page)
        if n >= 3:
            expect(panel, f"turn {n}: the panel names the turns left out").to_contain_text(LEFT_OUT)
            expect(panel).to_contain_text("Message 1:")
    assert "hit max new tokens" in last_stats(page)
    reused = metric(url, "orca_space_prompt_tokens_reused_total") - reused_before
    assert reused >= NEW_TOKENS, f"the session's turns reused {reused} prompt tokens of their kept cache"

    # 2) Continue the cut reply, past the context.
    page.locator(CONTINUE).click()
    expect(page.locator(REPLY_STATS).last).to_contain_text(
        f"{2 * NEW_TOKENS} tokens in 2 parts", timeout=60_000
    )
    wait_until_settled(page)
    expect(page.locator(BOT_MESSAGES)).to_have_count(6)

    # 3) Retry, edit and undo on a turn after the first were left out.
    retried = retry_last(page, max_new_tokens=NEW_TOKENS - 2)
    expect(page.locator(BOT_MESSAGES)).to_have_count(6)
    edited = edit_last_message(page, long_message("6, edited"), max_new_tokens=NEW_TOKENS - 4)
    assert retried and edited and retried != edited
    expect(page.locator(BOT_MESSAGES)).to_have_count(6)
    expect(page.locator(USER_MESSAGES).last).to_contain_text("Message 6, edited:")
    expect(panel).to_contain_text(LEFT_OUT)
    click_last(page, "Undo")
    expect(page.locator(BOT_MESSAGES)).to_have_count(5)
    assert_every_message_answered(page)
    open_settings(page)
    set_max_new_tokens(page, NEW_TOKENS)
    close_settings(page)

    # 4) Export, import into a new chat, and one more turn.
    open_panel(page, EXPORT_PANEL)
    with page.expect_download() as download:
        page.locator("#export-json").click()
    saved = tmp_path / "long.json"
    download.value.save_as(saved)
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(BOT_MESSAGES)).to_have_count(0)
    with page.expect_file_chooser() as chooser:
        page.locator("#import-json").click()
    chooser.value.set_files(str(saved))
    expect(page.locator(BOT_MESSAGES)).to_have_count(5)
    chat_and_wait(page, long_message("after import"))
    expect(page.locator(BOT_MESSAGES)).to_have_count(6)
    assert_every_message_answered(page)

    # 5) A saved conversation reopened from the sidebar, and continued.
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(BOT_MESSAGES)).to_have_count(0)
    page.locator("#conversations td").filter(has_text="Message 1:").first.click()
    reopened = page.locator(BOT_MESSAGES)
    expect(reopened.first).to_be_visible()
    count = reopened.count()
    assert count >= 5, f"the reopened conversation shows {count} replies"
    chat_and_wait(page, long_message("reopened"))
    expect(page.locator(BOT_MESSAGES)).to_have_count(count + 1)
    assert_every_message_answered(page)
    assert not page.errors, page.errors
    assert fetched == [], f"the page fetched pictures a message named, through the whole session: {fetched}"


def test_the_openai_api_refuses_a_conversation_over_the_context_and_answers_one_just_under(short_app):
    url, _, _ = short_app
    messages = [{"role": "system", "content": "You are a test."}]
    for n in range(2):
        messages += [
            {"role": "user", "content": long_message(f"v1-{n}")},
            {"role": "assistant", "content": "ok"},
        ]
    messages.append({"role": "user", "content": "and now?"})
    with httpx.Client(base_url=f"{url}/v1", timeout=60) as http:
        probe = http.post("/chat/completions", json={"messages": messages, "max_tokens": 1, "temperature": 0})
        assert probe.status_code == 200, probe.text
        prompt_tokens = probe.json()["usage"]["prompt_tokens"]
        room = CONTEXT - prompt_tokens
        fits = http.post(
            "/chat/completions", json={"messages": messages, "max_tokens": room, "temperature": 0}
        )
        assert fits.status_code == 200, (
            f"prompt {prompt_tokens} + {room} new tokens fills the context: {fits.text}"
        )
        over = http.post(
            "/chat/completions", json={"messages": messages, "max_tokens": room + 1, "temperature": 0}
        )
        assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded", (
            over.text
        )
        longer = [
            *messages[:-1],
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": long_message("x")},
        ]
        refused = http.post("/chat/completions", json={"messages": longer, "max_tokens": 8})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "context_length_exceeded"


def chat_session(url: str, messages: list[str]) -> list[str]:
    """One `/chat` session (gradio_client keeps its history on the server): each reply's text."""
    client = Client(url, verbose=False)
    replies = []
    for message in messages:
        job = client.submit(
            message, DEFAULT_SYSTEM_MESSAGE, *(PAGE_SETTINGS[k] for k in API_ORDER), api_name="/chat"
        )
        deadline = time.monotonic() + 120
        while not job.done():
            assert time.monotonic() < deadline, f"no answer to {message[:20]!r} in time"
            time.sleep(0.05)
        assert job.status().success, f"{message[:20]!r} failed: {job.exception()}"
        replies.append(job.outputs()[-1])
    return replies


def v1_session(url: str, messages: list[str]) -> list[str]:
    """One OpenAI-API conversation that sends its history each turn: each reply's text."""
    sent, replies = [{"role": "system", "content": "You are a test."}], []
    with httpx.Client(base_url=f"{url}/v1", timeout=120) as http:
        for message in messages:
            sent.append({"role": "user", "content": message})
            body = {"messages": sent, "max_tokens": NEW_TOKENS, "temperature": 0}
            response = http.post("/chat/completions", json=body)
            assert response.status_code == 200, response.text
            reply = response.json()["choices"][0]["message"]["content"]
            sent.append({"role": "assistant", "content": reply})
            replies.append(reply)
    return replies


def page_replies(page, folder: Path) -> list[str]:
    """The replies as the page holds them (its export), not as drawn: a reply's Markdown is
    drawn a moment after it ends, and a read of the drawing can be a step behind."""
    return [m["content"] for m in exported(page, folder)["messages"] if m["role"] == "assistant"]


def page_session_alone(browser, url: str, messages: list[str], folder: Path) -> list[str]:
    """The same page conversation with nothing else running: its replies."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        greedy_page(page, url)
        for message in messages:
            chat_and_wait(page, message)
        return page_replies(page, folder)
    finally:
        context.close()


def test_many_sessions_at_once_each_answer_as_if_alone_and_keep_plain_states(short_app, browser, tmp_path):
    """Two page sessions, two `/chat` and two `/v1` conversations at once, greedy; each session's
    replies equal a replay of it alone, the engine ends idle, and every state gradio keeps for
    these sessions is plain data it can hash."""
    url, runtime, demo = short_app
    turns = 4
    page_messages = [[long_message(f"p{s}-{n}") for n in range(turns)] for s in range(2)]
    chat_messages = [[long_message(f"c{s}-{n}") for n in range(turns)] for s in range(2)]
    v1_messages = [[f"Short question {s}-{n} about orcas." for n in range(turns)] for s in range(2)]
    contexts = [browser.new_context(viewport=VIEWPORT) for _ in range(2)]
    pages = [context.new_page() for context in contexts]
    try:
        for page in pages:
            greedy_page(page, url)
        with ThreadPoolExecutor(4) as pool:
            api = [pool.submit(chat_session, url, m) for m in chat_messages]
            api += [pool.submit(v1_session, url, m) for m in v1_messages]
            for n in range(turns):  # both pages send, then both wait: their replies overlap
                for page, messages in zip(pages, page_messages):
                    send(page.locator(CHAT_TEXTBOX), messages[n])
                for page in pages:
                    expect(page.locator(BOT_MESSAGES)).to_have_count(n + 1, timeout=120_000)
                    wait_until_settled(page, timeout_s=120)
            together = [future.result(timeout=300) for future in api]
        shown = [page_replies(page, tmp_path) for page in pages]
        for page in pages:
            assert_every_message_answered(page)
    finally:
        for context in contexts:
            context.close()

    alone = [page_session_alone(browser, url, messages, tmp_path) for messages in page_messages]
    alone += [chat_session(url, m) for m in chat_messages] + [v1_session(url, m) for m in v1_messages]
    assert all(len(replies) == turns for replies in shown + together), "a turn went unanswered"
    assert shown + together == alone, "a session's replies changed because others ran beside it"
    stats = runtime.engine.stats()
    assert stats.active == 0 and stats.queued == 0, f"the engine is not idle afterwards: {stats}"

    states = list(session_states(demo))
    assert len({session for session, _, _ in states}) >= 4, "the page and /chat sessions hold states"
    for session, label, value in states:
        assert is_plain_data(value), f"session {session[:8]}: {label} holds {type(value).__name__}"
        gradio_utils.deep_hash(value)  # what gradio does before and after each event


@pytest.fixture(scope="module")
def default_context_app(tiny_dir):
    with page_in_process("--model", str(tiny_dir)) as app:
        yield app


def test_thirty_long_turns_through_chat_at_the_default_context_are_all_answered(default_context_app):
    """About 1,000 tokens a message: the 8,192-token context is full from the eighth turn on."""
    url, runtime, _ = default_context_app
    messages = [long_message(str(n), repeats=100) for n in range(30)]
    replies = chat_session(url, messages)
    assert len(replies) == 30 and all(reply.strip() for reply in replies)
    assert runtime.engine.stats().active == 0


def test_a_page_failure_inside_gradio_is_said_under_the_message_and_the_next_one_works(
    short_app, page, monkeypatch
):
    """A reply step that fails inside gradio before its function runs (as its state hashing
    did, issue #21) leaves the message with a note saying so, and the next message is answered."""
    url, _, demo = short_app
    greedy_page(page, url)
    failed = threading.Event()
    track = demo.get_state_ids_to_track

    def failing_before_the_reply(block_fn, state):
        if block_fn.name == chat_hooks.REPLY_STEP and not failed.is_set():
            failed.set()
            raise TypeError("unhashable type: 'dict'")
        return track(block_fn, state)

    monkeypatch.setattr(demo, "get_state_ids_to_track", failing_before_the_reply)
    send(page.locator(CHAT_TEXTBOX), "This one fails inside gradio.")
    expect(page.locator(REPLY_STATS).last).to_contain_text("ended by an error")
    expect(page.locator(CHAT_TEXTBOX)).to_be_enabled()
    assert failed.is_set(), "the failure was injected"
    chat_and_wait(page, "And this one is answered.")
    expect(page.locator(BOT_MESSAGES)).to_have_count(1)
    expect(page.locator(USER_MESSAGES)).to_have_count(2)
