"""The gradio page. The only module that imports gradio.

A `gr.ChatInterface` (history per browser session, retry, undo, edit, saved conversations,
stop) around an async generator, so that a stop or a closed tab closes the generator and the
backend request is cancelled in its `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import gradio as gr

from ..engines.ladder import RUNG_SPEED
from ..engines.requests import EngineError
from ..params import LIMITS, PARAMETER_ORDER, check_value
from ..ratelimit import client_key
from ..runtime import ChatRuntime

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_MESSAGE = (
    "You are MistralOrca, a large language model trained by Alignment Lab AI. "
    "Write out your reasoning step-by-step to be sure you get the right answers!"
)
EXAMPLES = [
    "Please tell me about how mistral winds have attracted super-orcas.",
    "Write a Python function that checks whether a string is a palindrome, with tests.",
    "Explain the Pythagorean theorem and write it in LaTeX.",
    "I have 3 apples, eat one and buy 5 more. How many do I have? Think step by step.",
]
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]
SLIDER_STEPS = {
    "max_new_tokens": 1,
    "temperature": 0.05,
    "top_p": 0.01,
    "top_k": 1,
    "repetition_penalty": 0.01,
}
DEMO_BANNER = (
    "⚠️ **Demo mode: a tiny model with random weights.** Replies are gibberish; this preview is "
    "for trying the interface without a GPU or a download."
)


def build_ui(runtime: ChatRuntime) -> gr.Blocks:
    with gr.Blocks(title="Mistral-7B-OpenOrca chat", fill_height=True) as demo:
        gr.Markdown(header_markdown(runtime))
        if runtime.demo:
            gr.Markdown(DEMO_BANNER, elem_id="demo-banner")
        if runtime.zerogpu:
            gr.Markdown(zerogpu_note(), elem_id="zerogpu-note")
        status = gr.Markdown(status_markdown(runtime), elem_id="load-status")
        system_box = require_text(
            gr.Textbox(DEFAULT_SYSTEM_MESSAGE, label="System message", lines=2, max_lines=8, render=False),
            "system message",
        )
        chat = gr.ChatInterface(
            make_respond(runtime),
            chatbot=gr.Chatbot(
                label=runtime.model_name.rsplit("/", 1)[-1],
                latex_delimiters=LATEX_DELIMITERS,
                buttons=["copy", "copy_all"],
                placeholder="Ask MistralOrca anything.",
                scale=1,
                height="60vh",
            ),
            textbox=require_text(
                gr.Textbox(placeholder="Type a message…", submit_btn=True, stop_btn=True), "message"
            ),
            additional_inputs=[system_box, *parameter_sliders()],
            additional_inputs_accordion=gr.Accordion(
                "System message and generation settings", open=False, render=False
            ),
            examples=[[example] for example in EXAMPLES],
            save_history=True,
            editable=True,
            api_name="chat",
            concurrency_limit=runtime.concurrency,
            fill_height=True,
        )
        recover_from_errors(demo, chat)
        timer = gr.Timer(1.0, active=not runtime.status.ready)
        timer.tick(lambda: refresh_status(runtime), None, [status, timer], api_visibility="private")
        # The status baked into the page is from when it was built; refresh it at once.
        demo.load(lambda: refresh_status(runtime), None, [status, timer], api_visibility="private")
    return demo


def recover_from_errors(page: gr.Blocks, chat: gr.ChatInterface) -> None:
    """Hand the textbox back when a reply fails with gr.Error.

    ChatInterface re-enables its textbox in `.then()` steps, but gradio 6.31's front end runs
    only `.failure()` triggers after an error, so without this the chat stays locked behind a
    stop button until the page is reloaded. The handler does what those skipped steps do; the
    failed message stays in the chat, where retry and edit work on it. (On a stop, gradio runs
    both kinds of trigger, and this is the same clean-up again.)
    """
    for dependency_id, block_fn in list(page.fns.items()):
        if getattr(block_fn.fn, "__name__", "") != "_submit_fn":
            continue  # only the UI's reply steps; the API endpoint has no textbox to restore
        gr.events.Dependency(chat.textbox, {}, dependency_id, block_fn.fn).failure(
            restore_after_failure,
            [chat.chatbot],
            [chat.chatbot_state, chat.textbox],
            queue=False,
            api_visibility="undocumented",
        )


def restore_after_failure(shown_history: list):
    return shown_history, gr.Textbox(interactive=True, submit_btn=True, stop_btn=False)


def zerogpu_note() -> str:
    """What ZeroGPU means for speed, said before anyone waits for it."""
    from ..zerogpu import ASSUMED_DECODE_TOK_S, longest_reply_within_quota_call

    return (
        "⚡ **Running on ZeroGPU.** Each reply borrows a GPU of its own for just as long as it needs: "
        "nothing is shared between chats, so it streams at about "
        f"{ASSUMED_DECODE_TOK_S:.0f} tokens a second; the first message waits a little longer while "
        "the weights reach the GPU; and the GPU time each reply asks for counts against your daily "
        "ZeroGPU quota (logging in to Hugging Face gives more). One reply holds at most about "
        f"{longest_reply_within_quota_call():,} new tokens."
    )


def header_markdown(runtime: ChatRuntime) -> str:
    return (
        f"# 🐋 Chat with {runtime.model_name}\n"
        "ChatML prompts, streamed tokens, a real stop button. "
        f"Context: {runtime.context_length:,} tokens; the oldest turns are left out when it is full."
    )


def status_markdown(runtime: ChatRuntime) -> str:
    status = runtime.status
    if status.ready:
        return degraded_engine_markdown(runtime)
    if status.failed:
        return f"❌ **The model could not be loaded.** {status.message}"
    bar = (
        "" if status.fraction is None else f" `{'█' * int(status.fraction * 20):░<20}` {status.fraction:.0%}"
    )
    return f"⏳ {status.message}{bar}"


def degraded_engine_markdown(runtime: ChatRuntime) -> str:
    """When a faster engine failed on this GPU, say so, in plain words, for as long as it serves."""
    choice = runtime.engine_choice
    if choice is None or not choice.degraded:
        return ""
    why = "; ".join(f"the {f.rung} engine failed ({f.reason})" for f in choice.fallback)
    return f"⚠️ **Running on the {choice.engine} engine, {RUNG_SPEED[choice.engine]}**: {why}."


def refresh_status(runtime: ChatRuntime):
    done = runtime.status.ready or runtime.status.failed
    return status_markdown(runtime), gr.Timer(active=not done)


def name_parameter_in_errors(slider: gr.Slider, parameter: str) -> gr.Slider:
    """Make the slider's server-side check name its parameter.

    gradio's own check says only "Value 5.0 is greater than maximum value 2.0" and lets NaN
    through; API callers need to know which of the five numbers was wrong. (An instance
    override rather than a subclass: gradio writes a .pyi stub beside any component subclass.)
    """

    def preprocess(payload: object) -> float:
        try:
            return check_value(LIMITS[parameter], payload)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    slider.preprocess = preprocess
    return slider


def require_text(textbox: gr.Textbox, name: str) -> gr.Textbox:
    """Refuse what is not text, instead of gradio's `str(payload)` (which makes "{'a': 1}" of a dict
    and lets a null message crash gr.ChatInterface before `respond` can name the problem)."""

    def preprocess(payload: object) -> str:
        if not isinstance(payload, str):
            raise gr.Error(f"{name} must be text, got {type(payload).__name__}")
        return payload

    textbox.preprocess = preprocess
    return textbox


def parameter_sliders() -> list[gr.Slider]:
    return [
        name_parameter_in_errors(
            gr.Slider(
                minimum=LIMITS[name].low,
                maximum=LIMITS[name].high,
                value=LIMITS[name].default,
                step=SLIDER_STEPS[name],
                label=LIMITS[name].label,
                render=False,
            ),
            name,
        )
        for name in PARAMETER_ORDER
    ]


def make_respond(runtime: ChatRuntime):
    # Named parameters, in PARAMETER_ORDER, so the API documents them by name.
    async def respond(
        message,
        history,
        system_message,
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        repetition_penalty,
        request: gr.Request,
    ):
        enforce_rate_limit(runtime, request)
        service = runtime.service
        if service is None:
            raise gr.Error(not_ready_message(runtime))
        raw = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
        )
        assert tuple(raw) == PARAMETER_ORDER
        try:
            # Tokenizing a long history takes milliseconds: off the event loop, which streams
            # everyone else's replies.
            chat = await asyncio.to_thread(service.prepare, message, history, system_message, raw)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        if chat.dropped_turns:
            gr.Warning(
                f"Left out the {chat.dropped_turns} oldest turn(s): the conversation no longer fits "
                f"the {runtime.context_length:,}-token context with {chat.params.max_new_tokens} new tokens."
            )
        try:
            # Closed explicitly, not whenever the garbage collector gets to it: closing the
            # stream is what cancels the request in the engine (or the HTTP stream) on a stop.
            async with contextlib.aclosing(service.stream(chat, notify=gr.Info)) as updates:
                async for reply in updates:
                    yield reply.text
        except EngineError as exc:
            raise gr.Error(str(exc)) from None

    return respond


def enforce_rate_limit(runtime: ChatRuntime, request: gr.Request | None) -> None:
    if runtime.limiter is None or request is None:
        return
    peer = request.client.host if request.client else None
    key = client_key(
        request.username, peer, request.headers.get("x-forwarded-for"), runtime.trusted_proxy_hops
    )
    wait = runtime.limiter.acquire(key)
    if wait > 0:
        raise gr.Error(
            f"Too many messages: the limit is {runtime.limiter.limit} per minute. Try again in {wait:.0f} s."
        )


def not_ready_message(runtime: ChatRuntime) -> str:
    if runtime.status.failed:
        return f"The model could not be loaded: {runtime.status.message}"
    return f"The model is not ready yet: {runtime.status.message} Try again in a moment."
