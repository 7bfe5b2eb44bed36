"""The page's status line and wiring, without a server."""

from __future__ import annotations

import pytest

from orca_space.replies import Reply
from orca_space.runtime import ChatRuntime
from orca_space.web.ui import DEFAULT_SYSTEM_MESSAGE, build_ui, status_markdown


def test_status_line_follows_loading():
    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.status.update("downloading", "Downloading the weights…", 0.5)
    assert "Downloading" in status_markdown(runtime) and "50%" in status_markdown(runtime)
    runtime.status.update("failed", "The full model needs a CUDA GPU.")
    assert "could not be loaded" in status_markdown(runtime) and "CUDA GPU" in status_markdown(runtime)
    runtime.status.update("ready", "Ready.")
    assert status_markdown(runtime) == ""


def test_page_has_the_chat_api_and_demo_label():
    runtime = ChatRuntime(model_name="tiny", context_length=8192, demo=True)
    demo = build_ui(runtime)
    config = demo.get_config_file()
    names = [d.get("api_name") for d in config["dependencies"]]
    assert "chat" in names
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert "random weights" in texts, "demo mode is labelled on the page"
    assert DEFAULT_SYSTEM_MESSAGE in texts, "the system box starts with the model card's message"


def test_every_reply_step_has_a_failure_clean_up():
    """recover_from_errors finds ChatInterface's reply steps by name; a gradio upgrade that
    renames them must fail here, not silently lock the chat after errors again."""
    page = build_ui(ChatRuntime(model_name="m", context_length=8192))
    config = page.get_config_file()
    cleanups = [d["trigger_after"] for d in config["dependencies"] if d.get("trigger_only_on_failure")]
    assert len(cleanups) >= 3, "submit, retry and example reply steps each get a failure clean-up"
    assert all(page.fns[i].fn.__name__ == "_submit_fn" for i in cleanups)


@pytest.mark.anyio
async def test_closing_a_reply_closes_its_stream_at_once():
    """gradio stops a reply by closing the respond generator; the chat stream inside must close
    then (that is what cancels the engine request), not when the garbage collector runs."""
    import asyncio

    from orca_space.web.ui import make_respond

    closed = asyncio.Event()

    class Service:
        def prepare(self, message, history, system, raw):
            return type("Chat", (), {"dropped_turns": 0})()

        async def stream(self, chat, notify=None):
            try:
                while True:
                    yield Reply("more text")
            finally:
                closed.set()

    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.service = Service()
    reply = make_respond(runtime)("hi", [], "", 100, 0.4, 0.95, 40, 1.1, None)
    assert await anext(reply) == "more text"
    await reply.aclose()
    assert closed.is_set()
