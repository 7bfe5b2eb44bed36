"""Conversation links on the page, without a server: the wiring, and the share, open and delete steps."""

from __future__ import annotations

import gradio as gr
import pytest
from starlette.requests import Request

from orca_space.runtime import ChatRuntime
from orca_space.settings import parse_settings
from orca_space.sharing.links import ConversationLinks
from orca_space.sharing.store import DB_FILENAME, StoreLimits
from orca_space.startup import new_runtime
from orca_space.web.page import chat_display
from orca_space.web.page.link_page import DELETED, LINK_PATH, WRONG_TOKEN, make_delete_link, make_open_link
from orca_space.web.page.share_panel import NOT_HERE, link_url, make_share, visitor
from orca_space.web.page.ui import build_ui
from tests.test_sharing import HISTORY, SETTINGS

LAYOUT_PROPS = {
    "label",
    "show_label",
    "placeholder",
    "scale",
    "height",
    "elem_id",
    "elem_classes",
    "autoscroll",
    "value",
    "name",
}
# What one can do to the chat's messages (the link page is read-only), not how they are drawn.
ACTION_PROPS = {"editable", "_retryable", "_undoable", "examples"}


def request(
    query: str = "", client: str = "10.0.0.1", forwarded: str | None = None, username=None
) -> gr.Request:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/gradio_api/queue/join",
        "query_string": query.encode(),
        "headers": headers,
        "client": (client, 5000),
    }
    return gr.Request(request=Request(scope), username=username)


@pytest.fixture()
def runtime(tmp_path) -> ChatRuntime:
    links = ConversationLinks.in_directory(tmp_path, StoreLimits(max_snapshot_bytes=4096), per_hour=3)
    return ChatRuntime(model_name="Open-Orca/Mistral-7B-OpenOrca", context_length=8192, links=links)


def share(runtime: ChatRuntime, history=HISTORY, base="https://me-orca.hf.space/", **who):
    return make_share(runtime, runtime.links)(request(**who), history, "Be brief.", *SETTINGS.values(), base)


def test_the_page_gets_a_link_page_that_is_not_in_any_navigation_and_no_new_api(runtime):
    page = build_ui(runtime)
    config = page.get_config_file()
    assert (LINK_PATH, "Shared conversation", False) in config["pages"]
    public = [d.get("api_name") for d in config["dependencies"] if d.get("api_visibility") == "public"]
    assert public == ["chat"], "sharing adds no API endpoint"
    navbars = [c for c in config["components"] if c["type"] == "navbar"]
    assert len(navbars) == 2 and all(c["props"]["visible"] == "hidden" for c in navbars)


def test_the_link_page_draws_messages_exactly_as_the_chat(runtime):
    """Both Chatbots come from chat_display, so a change to how (and how safely) the chat draws
    messages reaches the link page too; this fails if either is built another way."""
    config = build_ui(runtime).get_config_file()
    chatbots = {
        page: [c for c in config["components"] if c["type"] == "chatbot" and c["id"] in spec["components"]]
        for page, spec in config["page"].items()
    }
    (chat,), (shared,) = chatbots[""], chatbots[LINK_PATH]

    def drawing(props: dict) -> dict:
        return {key: value for key, value in props.items() if key not in LAYOUT_PROPS | ACTION_PROPS}

    assert drawing(chat["props"]) == drawing(shared["props"])
    assert not shared["props"].get("editable") and not shared["props"]["_retryable"], (
        "the link page is read-only"
    )
    for key, value in chat_display.DISPLAY_OPTIONS.items():
        assert chat["props"][key] == value, key
    with pytest.raises(ValueError, match="sanitize_html"):
        chat_display.conversation_chatbot(sanitize_html=False)


def test_without_a_data_directory_the_page_offers_no_links():
    config = build_ui(ChatRuntime(model_name="m", context_length=8192)).get_config_file()
    assert [page for page, *_ in config["pages"]] == [""]


def test_share_shows_the_link_and_token_and_opening_it_shows_the_conversation(runtime):
    made, link, token, kept = share(runtime)
    assert made.visible is True and len(token) >= 32
    assert link.startswith("https://me-orca.hf.space/shared?id=")
    link_id = link.rsplit("=", 1)[1]
    assert f'"{link_id}"' in kept and f'"{token}"' in kept, "the browser keeps both"
    header, messages, carry_on, *_ = make_open_link(runtime.links)(request(f"id={link_id}"))
    assert "A shared conversation" in header and "Open\\-Orca/Mistral\\-7B\\-OpenOrca" in header
    assert messages == HISTORY and carry_on.link == f"./?continue={link_id}"
    with pytest.raises(gr.Error, match="not this link's"):
        make_delete_link(runtime.links)(request(f"id={link_id}"), "wrong")
    for empty in ("", "   "):  # asked for, not called wrong
        with pytest.raises(gr.Error, match="Paste the link's delete token first"):
            make_delete_link(runtime.links)(request(f"id={link_id}"), empty)
    assert make_delete_link(runtime.links)(request(f"id={link_id}"), token)[0] == f"## {DELETED}"
    header, messages, carry_on, *_ = make_open_link(runtime.links)(request(f"id={link_id}"))
    assert header == f"## {NOT_HERE}" and messages == [] and carry_on.visible is False
    assert WRONG_TOKEN


def test_a_refused_share_says_why_and_counts_per_visitor(runtime):
    with pytest.raises(gr.Error, match="No link was made: there is nothing to share yet"):
        share(runtime, history=[])
    with pytest.raises(gr.Error, match="holds at most 4 KB"):
        share(runtime, history=HISTORY * 20)
    for _ in range(3):
        share(runtime, forwarded="6.6.6.6")  # not believed: no trusted proxy
    with pytest.raises(gr.Error, match="3 an hour"):
        share(runtime, client="10.0.0.1")
    share(runtime, client="10.0.0.2")
    with pytest.raises(gr.Error, match="3 an hour"):  # the shared --auth login is no fresh limit
        share(runtime, client="10.0.0.1", username="alice")


def test_an_unusable_store_is_a_sentence_on_both_pages(runtime):
    path = runtime.links.store.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(gr.Error, match="No link was made: the conversation-link database is damaged"):
        share(runtime)
    header, messages, *_ = make_open_link(runtime.links)(request("id=" + "A" * 22))
    assert "unavailable right now" in header and "damaged" in header and messages == []
    assert path.name == DB_FILENAME


def test_links_are_built_from_the_page_the_browser_shows():
    link_id = "A" * 22
    assert link_url("http://127.0.0.1:7860/", link_id) == f"http://127.0.0.1:7860/shared?id={link_id}"
    assert link_url("https://host/sub/", link_id) == f"https://host/sub/shared?id={link_id}"
    for odd in ("", None, "javascript:alert(1)", "file:///etc/passwd"):
        assert link_url(odd, link_id) == f"./shared?id={link_id}"


def test_a_visitor_is_the_address_logged_in_or_not(runtime):
    # --auth is one account that everyone with the password shares: it names nobody.
    assert visitor(runtime, request(client="1.2.3.4", username="alice")) == "ip:1.2.3.4"
    assert visitor(runtime, request(client="1.2.3.4", forwarded="9.9.9.9")) == "ip:1.2.3.4"
    runtime.trusted_proxy_hops = 1
    assert visitor(runtime, request(client="1.2.3.4", forwarded="9.9.9.9")) == "ip:9.9.9.9"


def test_the_settings_reach_the_store_alike_for_every_backend(tmp_path):
    """Links keep text only: the local, remote and ZeroGPU runtimes (all made by new_runtime) get
    the same store, with the limits the flags set."""
    flags = [
        "--data-dir",
        str(tmp_path),
        "--link-max-kb",
        "64",
        "--links-max-mb",
        "2",
        "--link-expiry-days",
        "0.5",
    ]
    for backend in ([], ["--backend", "remote", "--endpoint", "http://127.0.0.1:9/v1"], ["--zerogpu"]):
        settings = parse_settings([*backend, *flags, "--links-per-hour", "7"], {})
        links = new_runtime(settings, "m", demo=False, concurrency=1).links
        assert links.store.path == tmp_path / DB_FILENAME and links.limiter.limit == 7
        assert links.store.limits == StoreLimits(64 << 10, 2 << 20, 43200.0)
    unlimited = parse_settings(["--data-dir", str(tmp_path), "--links-per-hour", "0"], {})
    links = new_runtime(unlimited, "m", demo=False, concurrency=1).links
    assert links.limiter is None and links.store.limits.expiry_s is None
