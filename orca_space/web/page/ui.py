"""The gradio page: the chat first, everything else folded under it.

A `gr.ChatInterface` (history per browser session, retry, undo, edit, saved conversations in a
sidebar, stop) around async generators (`replying`), so that a stop or a closed tab closes the
generator and the backend request is cancelled. Under each reply, a quiet line of figures;
under the chat, continue (for a reply that was cut), the settings with system-message presets,
and folded panels: the last reply's prompt, export and import, the engine.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import gradio as gr

from ...chat import DEFAULT_SYSTEM_MESSAGE
from ...engines.ladder import RUNG_SPEED
from ...params import LIMITS, PARAMETER_ORDER, Limit, check_value, max_new_tokens_limit
from ...reply_stats import last_reply_figures, settle
from ...runtime import ChatRuntime
from ...transcript import short_label
from ..refusals import refusal
from . import assets, chat_hooks
from .chat_display import conversation_chatbot
from .link_page import add_link_page
from .message_checks import add_message_counter, message_validator
from .panels import ChatControls, add_engine_panel, add_prompt_panel, add_transcript_panel
from .presets import CHOICES, DEFAULT_PRESET, preset_text
from .replying import make_continue, make_respond
from .saved_chats import add_saved_chat_controls
from .share_panel import add_share_panel

log = logging.getLogger(__name__)

EXAMPLES = [
    "Please tell me about how mistral winds have attracted super-orcas.",
    "Write a Python function that checks whether a string is a palindrome, with tests.",
    "Explain the Pythagorean theorem and write it in LaTeX.",
    "I have 3 apples, eat one and buy 5 more. How many do I have? Think step by step.",
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
SETTINGS_LABEL = "System message and generation settings"
PRIVATE = {"queue": False, "api_visibility": "private"}


def build_ui(runtime: ChatRuntime) -> gr.Blocks:
    # The page's CSS (assets.CSS) goes in at launch (web/server.py), as gradio 6 wants it.
    with gr.Blocks(title="Mistral-7B-OpenOrca chat", fill_height=True) as demo:
        gr.Markdown(header_markdown(runtime), elem_id="page-header")
        if runtime.demo:
            gr.Markdown(DEMO_BANNER, elem_id="demo-banner")
        if runtime.zerogpu:
            gr.Markdown(zerogpu_note(), elem_id="zerogpu-note")
        status = gr.Markdown(status_markdown(runtime), elem_id="load-status")
        # Built before the chat (its fn reads them) and shown after it, in this accordion.
        with gr.Accordion(SETTINGS_LABEL, open=False, render=False) as settings:
            preset = gr.Dropdown(CHOICES, value=DEFAULT_PRESET, label="Preset", elem_id="preset")
            system_box = require_text(
                gr.Textbox(
                    DEFAULT_SYSTEM_MESSAGE, label="System message", lines=2, max_lines=8, elem_id="system-box"
                ),
                "system message",
            )
            sliders = parameter_sliders(runtime.context_length)
        # States hold plain data only: gradio hashes them after every event and copies them into
        # each new session (see page_state). The last reply's prompt is a PromptView.as_state().
        last_prompt = gr.State(None)
        chat = build_chat(runtime, [system_box, *sliders], last_prompt)
        add_message_counter(chat.textbox, runtime.max_message_chars)
        with gr.Sidebar(open=False, width=260, elem_id="conversations") as sidebar:
            pass  # opened on wide screens as the page loads (see assets)
        chat_hooks.move_history_to(sidebar, chat)
        with sidebar:
            add_saved_chat_controls(chat)  # a delete per chat with undo, the open one marked
        actions, continue_step = add_continue(runtime, chat, [system_box, *sliders], last_prompt)
        settings.render()
        add_prompt_panel(last_prompt)
        controls = ChatControls(
            chat, system_box, preset, sliders, actions, lambda history: can_continue(runtime, history)
        )
        add_transcript_panel(runtime, controls)
        add_share_panel(demo, runtime, controls)
        add_engine_panel(runtime)
        wire_presets(preset, system_box)
        chat_hooks.recover_from_errors(demo, chat, extra_steps=[continue_step])
        chat_hooks.settle_after_replies(demo, chat)
        chat_hooks.after_each_reply(
            demo, chat, after_reply(runtime), [chat.chatbot, actions], extra_steps=[continue_step]
        )
        chat_hooks.answer_api_in_text(demo)
        timer = gr.Timer(1.0, active=not runtime.status.ready)
        timer.tick(
            lambda: refresh_status(runtime),
            None,
            [status, timer],
            show_progress="hidden",
            api_visibility="private",
        )
        # The status baked into the page is from when it was built; refresh it at once.
        demo.load(lambda: refresh_status(runtime), None, [status, timer], api_visibility="private")
        demo.load(None, js=assets.OPEN_SIDEBAR_ON_WIDE_SCREENS_JS)
        chat_hooks.after_each_reply(
            demo, chat, chat_hooks.placeholder_back, [chat.textbox], [continue_step], takes_chat=False
        )
    add_link_page(demo, runtime)  # a page of its own: after the chat page's `with` block
    return demo


def build_chat(runtime: ChatRuntime, inputs: list, last_prompt: gr.State) -> gr.ChatInterface:
    return gr.ChatInterface(
        make_respond(runtime),
        chatbot=conversation_chatbot(
            label=runtime.model_name.rsplit("/", 1)[-1],
            # The page's title names the model; a shown label floats over the replies at phone width.
            show_label=False,
            placeholder="Ask MistralOrca anything.",
            scale=1,
            height="60vh",
            elem_id="chatbot",
        ),
        textbox=require_text(
            gr.Textbox(
                placeholder=chat_hooks.MESSAGE_PLACEHOLDER,
                label="Message",  # its accessible name; ChatInterface hides the label
                submit_btn=True,
                stop_btn=True,
                elem_id="message-box",
            ),
            "message",
        ),
        additional_inputs=inputs,
        additional_outputs=[last_prompt],
        validator=message_validator(runtime),  # a refused message stays in the box, the reason under it
        examples=[[example] for example in EXAMPLES],
        cache_examples=False,  # caching would run the model at start-up, before it has loaded
        save_history=True,
        editable=True,
        api_name="chat",
        concurrency_limit=runtime.concurrency,
        fill_height=True,
    )


def add_continue(runtime: ChatRuntime, chat: gr.ChatInterface, inputs: list, last_prompt: gr.State):
    """The continue button, shown under a reply that was cut (max new tokens, or stopped), and its
    event: the textbox locks as for a reply, stop stops it, and the chat saves afterwards."""
    with gr.Row(visible=False, elem_id="reply-actions") as actions:
        button = gr.Button("Continue ▸", size="sm", scale=0, elem_id="continue")
    locked = button.click(
        lambda: (chat_hooks.locked_textbox(), hidden_row()), None, [chat.textbox, actions], **PRIVATE
    )
    streaming = locked.then(
        make_continue(runtime),
        [chat.chatbot_state, *inputs],
        [chat.chatbot, last_prompt],
        api_visibility="private",
        concurrency_limit=runtime.concurrency,
    )
    streaming.then(
        chat_hooks.settled_copies, [chat.chatbot], [chat.chatbot_state, chat.chatbot_value], **PRIVATE
    ).then(chat_hooks.unlocked_textbox, None, [chat.textbox], **PRIVATE).then(
        **chat_hooks.save_step(chat), **PRIVATE
    )
    chat.textbox.stop(None, None, None, cancels=[streaming], api_visibility="private")
    # Shown after a reply that can go on (see after_reply) or such an import; any other change
    # to the chat hides it.
    gr.on(chat_hooks.chat_changing_triggers(chat), hidden_row, None, [actions], **PRIVATE)
    return actions, streaming


def hidden_row() -> gr.Row:
    return gr.Row(visible=False)


def after_reply(runtime: ChatRuntime):
    """After a reply ends (or is stopped): its note settled on screen, and continue offered if
    it was cut."""

    def settle_and_offer(shown):
        settled = settle(shown or [])
        return (gr.skip() if settled == shown else settled), gr.Row(visible=can_continue(runtime, settled))

    return settle_and_offer


def can_continue(runtime: ChatRuntime, history: list) -> bool:
    figures = last_reply_figures(history)
    service = runtime.service
    return figures is not None and figures.can_continue and service is not None and service.continues_replies


def wire_presets(preset: gr.Dropdown, system_box: gr.Textbox) -> None:
    """A preset fills the system box; the menu names what the box will send (in the browser):
    the preset with its text, "No system message" when empty or only spaces, else "Custom".
    On `change`, not `input`: gradio 6.31's textbox fires `input` only for keys that type a
    character, so a cleared box (Ctrl+A, Backspace) kept the old preset's name."""
    preset.input(choose_preset, [preset], [system_box], **PRIVATE)
    system_box.change(None, [system_box], [preset], js=assets.preset_for_text_js(), **PRIVATE)


def choose_preset(name: str):
    try:
        text = preset_text(name)
    except ValueError as exc:
        raise refusal(str(exc)) from None
    return gr.skip() if text is None else text


def zerogpu_note() -> str:
    """What ZeroGPU means for speed, said before anyone waits for it."""
    from ...zerogpu import ASSUMED_DECODE_TOK_S, longest_reply_within_quota_call

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


def name_parameter_in_errors(slider: gr.Slider, limit: Limit) -> gr.Slider:
    """Make the slider's server-side check name its parameter as the slider is labelled.

    gradio's own check says only "Value 5.0 is greater than maximum value 2.0" and lets NaN
    through; people (and `/chat` API callers) need to know which of the five numbers was wrong.
    (An instance override rather than a subclass: gradio writes a .pyi stub beside any
    component subclass.)
    """

    def preprocess(payload: object) -> float:
        try:
            return check_value(limit, payload)
        except ValueError as exc:
            raise refusal(str(exc)) from None

    slider.preprocess = preprocess
    return slider


def require_text(textbox: gr.Textbox, name: str) -> gr.Textbox:
    """Refuse what is not text, instead of gradio's `str(payload)` (which makes "{'a': 1}" of a dict
    and lets a null message crash gr.ChatInterface before `respond` can name the problem)."""

    def preprocess(payload: object) -> str:
        if not isinstance(payload, str):
            raise refusal(f"{name} must be text, got {type(payload).__name__}")
        return payload

    textbox.preprocess = preprocess
    return textbox


def parameter_sliders(context_length: int) -> list[gr.Slider]:
    """The five generation sliders; max new tokens fitted to the context (`max_new_tokens_limit`)."""
    limits = page_limits(context_length)
    return [
        name_parameter_in_errors(
            gr.Slider(
                minimum=lowest_setting(limits[name], SLIDER_STEPS[name]),
                maximum=limits[name].high,
                value=limits[name].default,
                step=SLIDER_STEPS[name],
                label=LIMITS[name].label,
            ),
            limits[name],
        )
        for name in PARAMETER_ORDER
    ]


def lowest_setting(limit: Limit, step: float) -> float:
    """The slider's lowest stop: top-p's range is (0, 1], so its slider starts a step above 0."""
    return limit.low if limit.low_inclusive else limit.low + step


def page_limits(context_length: int) -> dict[str, Limit]:
    """The sliders' limits, each named as its slider is labelled, so that a refusal says
    "Top-p must be in (0, 1]" rather than the code's `top_p`."""
    limits = {**LIMITS, "max_new_tokens": max_new_tokens_limit(context_length)}
    return {name: replace(limit, name=short_label(name)) for name, limit in limits.items()}
