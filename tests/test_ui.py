"""The page without a server: its wiring into gr.ChatInterface, and its reply functions on fakes."""

from __future__ import annotations

import asyncio
import json

import gradio as gr
import pytest

from orca_space.chat import DEFAULT_SYSTEM_MESSAGE, ChatLimits, ChatService
from orca_space.engines.requests import EngineError
from orca_space.replies import ReplyDelta
from orca_space.reply_stats import ReplyFigures, read_figures, reply_message, stats_note, waiting_note
from orca_space.runtime import ChatRuntime
from orca_space.transcript import conversation_json
from orca_space.web.page import chat_hooks
from orca_space.web.page.page_state import is_plain_data
from orca_space.web.page.panels import import_conversation, read_import
from orca_space.web.page.prompt_view import PromptView
from orca_space.web.page.replying import make_continue, make_respond
from orca_space.web.page.typed_message import shown_message
from orca_space.web.page.ui import build_ui, choose_preset, status_markdown

PARAMS = (100, 0.4, 0.95, 40, 1.1)


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
    public = [d.get("api_name") for d in config["dependencies"] if d.get("api_visibility") == "public"]
    assert public == ["chat"], "the page's own events stay out of the API"
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert "random weights" in texts, "demo mode is labelled on the page"
    assert DEFAULT_SYSTEM_MESSAGE in texts, "the system box starts with the model card's message"


@pytest.fixture(scope="module")
def page():
    return build_ui(ChatRuntime(model_name="m", context_length=8192))


def reply_step_ids(page) -> set[int]:
    return {i for i, fn in page.fns.items() if fn.name in (chat_hooks.REPLY_STEP, "continue_reply")}


def test_every_reply_step_has_a_failure_clean_up(page):
    """recover_from_errors finds ChatInterface's reply steps by name; a gradio upgrade that
    renames them must fail here, not silently lock the chat after errors again."""
    config = page.get_config_file()
    cleanups = [d["trigger_after"] for d in config["dependencies"] if d.get("trigger_only_on_failure")]
    steps = reply_step_ids(page)
    assert len(steps) >= 4, "submit, retry, edit, example and continue reply steps"
    assert steps <= set(cleanups), "every reply step gets a failure clean-up"


def test_every_reply_step_is_settled_on_screen_and_in_the_history(page):
    """A stopped reply's note stops spinning: after each reply step, on screen (after_reply), and
    in ChatInterface's chatbot -> state sync steps, whose function the page replaces."""
    after = {fn.trigger_after for fn in page.fns.values() if fn.name == "settle_and_offer"}
    assert reply_step_ids(page) <= after
    syncs = [fn for fn in page.fns.values() if fn.fn is chat_hooks.settled_copies]
    assert len(syncs) >= 8, "every sync ChatInterface wires (after replies, undo, clear, loads) settles"
    shapes = {(tuple(type(b) for b in fn.inputs), tuple(type(b) for b in fn.outputs)) for fn in syncs}
    assert shapes == {((gr.Chatbot,), (gr.State, gr.State))}, "chatbot -> history states, nothing else"


def test_uploads_stay_off(page):
    config = page.get_config_file()
    kinds = {c["type"] for c in config["components"]}
    assert not kinds & {"file", "uploadbutton", "multimodaltextbox"}, "import reads files in the browser"


class Backend:
    """Replies with fixed pieces, then finishes for `reason`; continues too."""

    continues_replies = True

    def __init__(self, pieces=("Hel", "lo", " there"), reason="length", forever=False):
        self.pieces, self.reason, self.forever = pieces, reason, forever
        self.calls = []
        self.closed = asyncio.Event()

    async def stream_reply(self, messages, params, notify=None, cache_scope=None):
        self.calls.append(messages)
        try:
            for piece in self.pieces:
                yield ReplyDelta(piece, tokens=1)
            while self.forever:
                yield ReplyDelta("more", tokens=1)
                await asyncio.sleep(0)
            yield ReplyDelta(finish_reason=self.reason)
        finally:
            self.closed.set()


def ready_runtime(encoder, backend) -> ChatRuntime:
    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.service = ChatService(backend, encoder, ChatLimits(update_interval_s=0.0))
    runtime.status.update("ready", "Ready.")
    return runtime


async def collect(generator):
    return [update async for update in generator]


@pytest.mark.anyio
async def test_a_reply_streams_with_its_figures_and_the_prompt_once(encoder):
    runtime = ready_runtime(encoder, Backend())
    updates = await collect(make_respond(runtime)("hi", [], "Be brief.", *PARAMS, None))
    (note,), nothing = updates[0]
    assert note["metadata"]["title"] == "Waiting for the first token…" and nothing == gr.skip(), (
        "a note shows at once, before any work that could fail"
    )
    messages, state = updates[1]
    assert is_plain_data(state), "the prompt view is kept in a gr.State as plain data"
    view = PromptView.from_state(state)
    assert view.text.startswith("<s><|im_start|>system\nBe brief.") and view.as_state() == state
    assert all(later == gr.skip() for _, later in updates[2:]), "the prompt panel's state is set once"
    last, _ = updates[-1]
    assert last[0] == reply_message("Hello there")
    figures = read_figures(last[1])
    assert (
        figures.tokens == 3
        and figures.ending == "length"
        and last[1]["metadata"]["title"].endswith("hit max new tokens")
    )
    assert read_figures(messages[1]).ending is None, "while streaming the note names no ending"


@pytest.mark.anyio
async def test_notes_in_the_history_never_reach_the_model(encoder):
    backend = Backend()
    runtime = ready_runtime(encoder, backend)
    history = [
        {"role": "user", "content": "hi"},
        reply_message("yo"),
        stats_note(ReplyFigures(1, ending="stop")),
    ]
    await collect(make_respond(runtime)("again", history, "", *PARAMS, None))
    assert [m["role"] for m in backend.calls[0]] == ["user", "assistant", "user"]


@pytest.mark.anyio
async def test_closing_a_reply_closes_its_stream_at_once(encoder):
    """gradio stops a reply by closing the respond generator; the chat stream inside must close
    then (that is what cancels the engine request), not when the garbage collector runs."""
    backend = Backend(forever=True)
    reply = make_respond(ready_runtime(encoder, backend))("hi", [], "", *PARAMS, None)
    await anext(reply)  # the note shown at once
    messages, _ = await anext(reply)
    assert messages[0]["content"]
    await reply.aclose()
    assert backend.closed.is_set()


class FailingBackend(Backend):
    """Streams its pieces, then fails the way an engine or a remote server does."""

    def __init__(self, error: Exception, pieces=("Hel", "lo")):
        super().__init__(pieces)
        self.error = error

    async def stream_reply(self, messages, params, notify=None, cache_scope=None):
        for piece in self.pieces:
            yield ReplyDelta(piece, tokens=1)
        raise self.error


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error, said",
    [(EngineError("the server stopped"), "the server stopped"), (RuntimeError("a bug"), "unexpected error")],
)
async def test_a_reply_that_fails_settles_its_own_note_before_raising(encoder, error, said):
    """The page's failure clean-up also runs on a stop, racing the after-reply step; it cannot
    say "ended by an error", so a failing reply must, in its last update. An unforeseen error
    is one sentence for the person, its trace for the log."""
    reply = make_respond(ready_runtime(encoder, FailingBackend(error)))("hi", [], "", *PARAMS, None)
    updates = []
    with pytest.raises(gr.Error, match=said):
        async for update in reply:
            updates.append(update)
    last, _ = updates[-1]
    assert last[0] == reply_message("Hello"), "the text shown before the error stays"
    assert read_figures(last[1]).ending == "failed"
    assert last[1]["metadata"]["title"].endswith("ended by an error")
    assert all(read_figures(messages[-1]).ending is None for messages, _ in updates[:-1])


@pytest.mark.anyio
async def test_a_reply_refused_before_it_began_says_so_under_the_message(encoder):
    """A refusal (here: a parameter out of range) raises its own sentence, and the note shown at
    once says the message ended by an error instead of spinning or vanishing."""
    reply = make_respond(ready_runtime(encoder, Backend()))("hi", [], "", 100, 9.0, 0.95, 40, 1.1, None)
    updates = []
    with pytest.raises(gr.Error, match="Temperature must be in"):  # as the slider names it
        async for update in reply:
            updates.append(update)
    assert len(updates) == 2, updates
    (note,), _ = updates[-1]
    assert read_figures(note).ending == "failed" and note["metadata"]["status"] == "done"


def test_a_message_left_bare_by_a_failure_inside_gradio_gets_a_note():
    """gradio can fail an event before the reply function runs (issue #21: hashing a state); the
    user's message then has no reply and no note, and the failure clean-up adds one."""
    bare = [{"role": "user", "content": "hi"}, reply_message("yo"), {"role": "user", "content": "again"}]
    shown, state, textbox = chat_hooks.restore_after_failure(bare)
    assert shown == state and shown[:3] == bare and len(shown) == 4
    assert read_figures(shown[3]).ending == "failed" and "ended by an error" in shown[3]["metadata"]["title"]
    assert textbox.interactive is True
    answered = [*bare[:2], stats_note(ReplyFigures(1, ending="stop"))]
    assert chat_hooks.restore_after_failure(answered)[0] == answered, "nothing added under a reply"


@pytest.mark.anyio
async def test_a_continue_that_fails_settles_its_merged_note(encoder):
    cut = ReplyFigures(tokens=20, ending="length")
    history = [{"role": "user", "content": "hi"}, reply_message("Hello there"), stats_note(cut)]
    runtime = ready_runtime(encoder, FailingBackend(EngineError("out of memory"), pieces=(" and",)))
    updates = []
    with pytest.raises(gr.Error, match="out of memory"):
        async for update in make_continue(runtime)(history, "", *PARAMS, None):
            updates.append(update)
    shown = updates[-1][0]
    assert shown[1] == reply_message("Hello there and")
    assert (read_figures(shown[2]).tokens, read_figures(shown[2]).ending) == (21, "failed")


def test_a_stop_settles_the_same_whichever_clean_up_step_wins():
    """On a stop gradio's front end runs the failure clean-up and the after-reply steps at once;
    the last answer draws the chat, so they must agree on a stopped reply, and both leave a
    note the reply settled itself (failed) as it is."""
    streaming = [{"role": "user", "content": "hi"}, reply_message("Hel"), stats_note(ReplyFigures(1))]
    after_failure, _, _ = chat_hooks.restore_after_failure(streaming)
    after_reply, _ = chat_hooks.settled_copies(streaming)
    assert after_failure == after_reply and read_figures(after_reply[2]).ending == "stopped"
    failed = [*streaming[:2], stats_note(ReplyFigures(1, ending="failed"))]
    assert chat_hooks.restore_after_failure(failed)[0] == failed == chat_hooks.settled_copies(failed)[0]


@pytest.mark.anyio
async def test_a_message_sent_while_loading_waits_and_is_answered(encoder, monkeypatch):
    monkeypatch.setattr("orca_space.web.page.replying.LOAD_POLL_S", 0.01)
    runtime = ChatRuntime(model_name="m", context_length=8192)
    runtime.status.update("downloading", "Downloading the weights…", 0.4)
    reply = make_respond(runtime)("hi", [], "", *PARAMS, None)
    await anext(reply)  # the note shown at once
    waiting, _ = await anext(reply)
    assert waiting == [waiting_note("Waiting for the model: Downloading the weights… 40%")]
    runtime.service = ChatService(Backend(), encoder, ChatLimits(update_interval_s=0.0))
    runtime.status.update("ready", "Ready.")
    rest = [update async for update in reply]
    assert rest[-1][0][0] == reply_message("Hello there"), "the real reply replaces the waiting note"


@pytest.mark.anyio
async def test_only_a_failed_load_refuses(monkeypatch):
    monkeypatch.setattr("orca_space.web.page.replying.LOAD_POLL_S", 0.01)
    runtime = ChatRuntime(model_name="m", context_length=8192)
    reply = make_respond(runtime)("hi", [], "", *PARAMS, None)
    await anext(reply)  # the note shown at once
    await anext(reply)  # waiting for the model
    runtime.status.update("failed", "The full model needs a CUDA GPU.")
    (note,), _ = await anext(reply)
    assert note["metadata"]["title"].endswith("ended by an error"), "the waiting note says it failed"
    with pytest.raises(gr.Error, match="could not be loaded: The full model needs a CUDA GPU"):
        await anext(reply)


@pytest.mark.anyio
async def test_continue_grows_the_same_reply_and_adds_up_its_tokens(encoder):
    backend = Backend(pieces=(" and", " more."), reason="stop")
    runtime = ready_runtime(encoder, backend)
    cut = ReplyFigures(tokens=20, first_token_s=0.1, tokens_per_s=10.0, ending="length")
    history = [{"role": "user", "content": "hi"}, reply_message("Hello there"), stats_note(cut)]
    updates = await collect(make_continue(runtime)(history, "", *PARAMS, None))
    shown, view = updates[-1][0], PromptView.from_state(updates[0][1])
    assert shown[:2] == history[:2][:1] + [reply_message("Hello there and more.")], "one reply, grown"
    assert len(shown) == 3, "still one reply and one note: not a new turn"
    merged = read_figures(shown[2])
    assert (merged.tokens, merged.parts, merged.ending) == (22, 2, "stop"), "20 before, 2 now"
    assert backend.calls[0][-1] == {"role": "assistant", "content": "Hello there"}, "the open turn"
    assert view.continued


@pytest.mark.anyio
async def test_continue_is_refused_where_the_backend_cannot(encoder):
    backend = Backend()
    backend.continues_replies = False
    history = [{"role": "user", "content": "hi"}, reply_message("Hello")]
    with pytest.raises(gr.Error, match="cannot continue"):
        await collect(make_continue(ready_runtime(encoder, backend))(history, "", *PARAMS, None))


def test_the_api_answers_text_only(page, encoder):
    """The /chat endpoint's step yields the reply's text, as before notes existed (tests/test_app.py
    and bench/stress.py read it), and nothing while only a note would be shown."""
    step = next(fn for fn in page.fns.values() if fn.api_name == "chat")
    assert getattr(step.fn, "answers_text", False), "the /chat step is wrapped"

    async def responses(*args):
        yield [waiting_note("Loading…")], [], None
        yield [reply_message("Hel"), stats_note(ReplyFigures(1))], ["h"], None
        yield [reply_message("Hello"), stats_note(ReplyFigures(2, ending="stop"))], ["h"], None

    wrapped = chat_hooks_wrap(responses)
    assert asyncio.run(collect(wrapped())) == [("Hel", ["h"], None), ("Hello", ["h"], None)]


def chat_hooks_wrap(stream):
    page = type("Page", (), {"fns": {0: type("Fn", (), {"api_name": "chat", "fn": stream})()}})()
    chat_hooks.answer_api_in_text(page)
    return page.fns[0].fn


def test_a_preset_fills_the_box_and_custom_leaves_it():
    assert choose_preset("Coding assistant").startswith("You are an expert programmer")
    assert choose_preset("Custom") == gr.skip()
    with pytest.raises(gr.Error, match="unknown preset"):
        choose_preset("Evil")


def test_import_loads_everything_or_nothing():
    runtime = ChatRuntime(model_name="m", context_length=8192)
    load = import_conversation(runtime, can_continue=lambda history: True)
    history = [
        {"role": "user", "content": "hi"},
        reply_message("Hello"),
        stats_note(ReplyFigures(3, ending="length")),
    ]
    text = conversation_json(history, "Be brief.", {"temperature": 0.0}, "m")
    outputs = load(read_import(text, len(text)))
    assert outputs[0] == history and outputs[1] == history and outputs[3] is None, (
        "shown, in state, a new chat"
    )
    assert outputs[4] == "Be brief." and outputs[5] == "Custom" and outputs[7] == 0.0
    forged = json.dumps({**json.loads(text), "messages": [{"role": "system", "content": "evil"}]})
    with pytest.raises(gr.Error, match="role 'system'"):
        read_import(forged, len(forged))
    assert all(output == gr.skip() for output in load(read_import("", -1))), "a closed picker changes nothing"


def test_the_chat_goes_to_the_browser_as_written_and_comes_back_so(page):
    """What the browser gets is what it sends back as the next turn's history: a reply's raw HTML
    is made literal and a user's message a verbatim block on the way out, both restored on the
    way in; nothing else is rewritten (gradio's cleandoc took the indentation and tabs of a
    pasted snippet before)."""
    chatbot = next(block for block in page.blocks.values() if isinstance(block, gr.Chatbot))
    # gradio rebuilds a session's chatbot from its constructor arguments when an event sets one of
    # its properties (opening a saved conversation does): the rebuilt one must send as written too.
    rebuilt = gr.Chatbot(**{**chatbot.constructor_args, "render": False})
    assert_sent_as_written(chatbot)
    assert_sent_as_written(rebuilt)


def assert_sent_as_written(chatbot):
    typed = "  two spaces first\n\tthen a tab <b>and a tag</b>\n"
    reply = "See <b>this</b>, `<i>code</i>` and $a<b$."
    history = [
        {"role": "user", "content": typed},
        reply_message(reply),
        stats_note(ReplyFigures(3, ending="stop")),
    ]
    sent = chatbot.postprocess(history)
    texts = [message.content[0].text for message in sent.root]
    assert texts[:2] == [shown_message(typed), "See &lt;b>this&lt;/b>, `<i>code</i>` and $a<b$."]
    back = chatbot.preprocess(sent)
    assert [part["text"] for message in back for part in message["content"]] == [typed, reply, ""]
    assert read_figures(back[2]) == ReplyFigures(3, ending="stop"), "the note's figures survive"


def test_an_import_keeps_max_new_tokens_within_this_context():
    """A chat exported with max new tokens 4000, imported where the context is 300: the slider gets
    the most this context allows (172), not a value every message would be refused for."""
    load = import_conversation(ChatRuntime(model_name="m", context_length=300), can_continue=lambda h: False)
    text = conversation_json([], "", {"max_new_tokens": 4000, "top_k": 5}, "m")
    outputs = load(read_import(text, len(text)))
    assert (outputs[6], outputs[9]) == (172, 5), "max new tokens fitted, the other settings as they were"


@pytest.mark.anyio
async def test_continue_needs_the_chat_to_end_with_a_reply(encoder):
    """After a reply, a message that failed: continue must not go on with the reply above it."""
    history = [
        {"role": "user", "content": "hi"},
        reply_message("Hello"),
        {"role": "user", "content": "failed"},
    ]
    with pytest.raises(gr.Error, match="no reply to continue"):
        await collect(make_continue(ready_runtime(encoder, Backend()))(history, "", *PARAMS, None))


def test_saved_conversations_live_in_a_sidebar_that_starts_folded(page):
    """On a phone the chat comes first: the conversation list sits in a sidebar, folded until the
    page opens it on a wide screen (assets.OPEN_SIDEBAR_ON_WIDE_SCREENS_JS)."""
    sidebar = next(block for block in page.blocks.values() if isinstance(block, gr.Sidebar))
    assert sidebar.open is False and sidebar.elem_id == "conversations"

    def inside(block) -> list:
        return [block, *(b for child in getattr(block, "children", []) for b in inside(child))]

    kinds = {type(block) for block in inside(sidebar)}
    assert {gr.Dataset, gr.Button} <= kinds, "the new-chat button and the conversation list"
