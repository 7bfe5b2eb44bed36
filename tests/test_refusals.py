"""Refusals on the page: one line in the log (no traceback), the reason in the page's words."""

from __future__ import annotations

import logging

import gradio as gr
import pytest

from orca_space.chat import ChatLimits, ChatService
from orca_space.params import check_value
from orca_space.runtime import ChatRuntime
from orca_space.web.page.replying import make_respond
from orca_space.web.page.ui import page_limits
from orca_space.web.refusals import in_page_words, refusal


def test_a_refusal_logs_one_line_and_asks_gradio_for_no_traceback(caplog):
    with caplog.at_level(logging.INFO, logger="orca_space.web.refusals"):
        error = refusal("message is empty")
    assert isinstance(error, gr.Error) and error.message == "message is empty"
    assert error.print_exception is False, "gradio prints the traceback of any gr.Error that asks for it"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "refused: message is empty")
    ]


@pytest.mark.parametrize(
    "reason, shown",
    [
        ("max_new_tokens (600) must be below the context length (512)", "Max new tokens (600) must be below"),
        ("temperature must be 0 (greedy) or at least 0.01, got 0.005", "Temperature must be 0 (greedy)"),
        ("top_k must be a whole number, got 0.5", "Top-k must be a whole number"),
        ("message is 17,000 characters; the limit is 16,000", "message is 17,000 characters"),
    ],
)
def test_the_page_names_parameters_as_its_sliders_do(reason, shown):
    assert in_page_words(reason).startswith(shown)


def test_the_sliders_refuse_in_their_own_words():
    limits = page_limits(300)
    assert (limits["max_new_tokens"].high, limits["max_new_tokens"].default) == (172, 150)
    with pytest.raises(ValueError, match=r"^Top-p must be in \(0, 1\], got 0$"):
        check_value(limits["top_p"], 0)


class NoBackend:
    async def stream_reply(self, messages, params, notify=None, cache_scope=None):
        raise AssertionError("a refused message never reaches the backend")
        yield


@pytest.mark.anyio
async def test_a_refused_message_is_a_quiet_gr_error_naming_the_slider(encoder, caplog):
    runtime = ChatRuntime(model_name="m", context_length=300)
    runtime.service = ChatService(NoBackend(), encoder, ChatLimits(context_length=300))
    runtime.status.update("ready", "Ready.")
    reply = make_respond(runtime)("hi", [], "", 300, 0.4, 0.95, 40, 1.1, None)
    with caplog.at_level(logging.INFO), pytest.raises(gr.Error) as refused:
        async for _ in reply:
            pass
    assert refused.value.message == "Max new tokens (300) must be below the context length (300)"
    assert refused.value.print_exception is False
    assert [r.getMessage() for r in caplog.records if r.name.endswith("refusals")] == [
        "refused: Max new tokens (300) must be below the context length (300)"
    ]


@pytest.mark.anyio
async def test_a_bug_is_no_refusal_and_keeps_its_traceback(encoder, caplog):
    class Broken:
        async def stream_reply(self, messages, params, notify=None, cache_scope=None):
            raise KeyError("a bug")
            yield

    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.service = ChatService(Broken(), encoder, ChatLimits())
    runtime.status.update("ready", "Ready.")
    with caplog.at_level(logging.INFO), pytest.raises(gr.Error, match="unexpected error"):
        async for _ in make_respond(runtime)("hi", [], "", 16, 0.4, 0.95, 40, 1.1, None):
            pass
    traced = [r for r in caplog.records if r.exc_info and r.exc_info[0] is KeyError]
    assert len(traced) == 1, "the server's own fault is logged with its traceback, once"
    assert not [r for r in caplog.records if r.getMessage().startswith("refused:")], "a bug is no refusal"
