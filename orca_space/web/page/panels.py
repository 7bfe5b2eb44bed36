"""The folded panels under the chat: the last reply's prompt, export and import, the engine.

Each `add_*` builds one panel's components and events inside the current gr.Blocks. They are
closed by default, and what they show is computed only while they are open.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import gradio as gr

from ...params import PARAMETER_ORDER, max_new_tokens_limit
from ...runtime import ChatRuntime
from ...transcript import (
    Transcript,
    TranscriptError,
    conversation_json,
    conversation_markdown,
    parse_transcript,
)
from ..refusals import refusal
from . import assets, chat_hooks
from .engine_panel import engine_markdown
from .presets import preset_for
from .prompt_view import CONTROL_LABEL, PromptView, highlighted, summary_markdown

ENGINE_REFRESH_S = 2.0


@dataclass
class ChatControls:
    """What the panels read and write of the chat: ChatInterface's parts and the settings."""

    chat: gr.ChatInterface
    system_box: gr.Textbox
    preset: gr.Dropdown
    sliders: list[gr.Slider]
    continue_row: gr.Row  # shown when the chat ends with a reply that can go on
    can_continue: Callable[[list], bool]


def add_prompt_panel(last_prompt: gr.State) -> None:
    """The exact ChatML of the last reply, its tokens against the budget, the turns left out."""
    with gr.Accordion("Prompt of the last reply", open=False) as panel:
        summary = gr.Markdown(summary_markdown(None), elem_id="prompt-summary")
        text = gr.HighlightedText(
            [],
            color_map={CONTROL_LABEL: "#f59e0b"},
            show_inline_category=False,
            show_label=False,
            combine_adjacent=False,
            elem_id="prompt-text",
        )
    is_open = gr.State(False)
    outputs = [summary, text]
    # Filled quietly: gradio dims an output to 0.2 opacity while its event runs and fades it back,
    # a flicker after every reply for a fill that takes milliseconds.
    private = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    panel.expand(show_prompt, [last_prompt], outputs, **private).then(
        lambda: True, None, [is_open], **private
    )
    panel.collapse(lambda: False, None, [is_open], **private)
    last_prompt.change(show_prompt_if_open, [last_prompt, is_open], outputs, **private)


def show_prompt(state: dict | None):
    view = PromptView.from_state(state)
    return summary_markdown(view), highlighted(view)


def show_prompt_if_open(state: dict | None, is_open: bool):
    return show_prompt(state) if is_open else (gr.skip(), gr.skip())


def add_transcript_panel(runtime: ChatRuntime, controls: ChatControls) -> None:
    """Download the chat as JSON or Markdown; load a JSON file back to continue it.

    Files never go through gradio's uploads (`max_file_size=0` refuses those on every route):
    the browser reads the picked file and sends its text through an ordinary event, where
    `parse_transcript` checks its size and every field. Downloads are made in the browser from
    text the server writes, so nothing is stored on the server either.
    """
    chat = controls.chat
    settings_inputs = [chat.chatbot, controls.system_box, *controls.sliders]
    with gr.Accordion("Export and import", open=False):
        with gr.Row():
            as_json = gr.Button("⬇ Download JSON", size="sm", elem_id="export-json")
            as_markdown = gr.Button("⬇ Download Markdown", size="sm", elem_id="export-markdown")
            load = gr.Button("⬆ Import JSON…", size="sm", elem_id="import-json")
        gr.Markdown("A JSON file holds the messages, the system message, the settings and the model's name.")
        json_text, markdown_text, picked_text = (gr.Textbox(visible=False) for _ in range(3))
        picked_size = gr.Number(visible=False)

    def export(render):
        def export_text(history, system_message, *values):
            settings = dict(zip(PARAMETER_ORDER, values, strict=True))
            return render(history or [], system_message or "", settings, runtime.model_name)

        return export_text

    private = {"queue": False, "api_visibility": "private"}
    as_json.click(export(conversation_json), settings_inputs, [json_text], **private).then(
        None, [json_text], None, js=assets.save_text_js("json", "application/json"), **private
    )
    as_markdown.click(export(conversation_markdown), settings_inputs, [markdown_text], **private).then(
        None, [markdown_text], None, js=assets.save_text_js("md", "text/markdown"), **private
    )
    picked = gr.State(None)  # the checked file, as plain data, between the two steps
    load.click(
        read_import,
        [picked_text, picked_size],
        [picked],
        js=assets.pick_file_js(),
        # Queued, so that a refused file's gr.Error shows its message in a toast. Its only output
        # is a state: gradio covers an event's visible outputs with a red "Error" when it fails,
        # and a refused file must change nothing on the page, the chat least of all.
        api_visibility="private",
        show_progress="hidden",
    ).success(
        import_conversation(runtime, controls.can_continue),
        [picked],
        loaded_conversation_outputs(controls),
        **private,
    ).success(**chat_hooks.save_step(chat, save_imported(chat)), **private)


def save_imported(chat: gr.ChatInterface):
    """Save the imported chat as ChatInterface saves one after each turn (a new saved
    conversation, since the import cleared its id); nothing when nothing was imported."""
    save = chat_hooks.save_conversation(chat)

    def save_if_any(index, history, saved):
        if not history:
            return gr.skip(), gr.skip()
        return save(index, chat_hooks.as_chat_interface_keeps(history), saved)

    return save_if_any


def read_import(text: str, size: float) -> dict | None:
    """The picked file, checked (`parse_transcript`), as plain data; None when the file picker
    was closed without a choice. A file that is no conversation is refused with its reason."""
    if text == "" and size == -1:
        return None
    try:
        return asdict(parse_transcript(text, size))
    except TranscriptError as exc:
        raise refusal(f"Could not import the conversation: {exc}.") from None


def import_conversation(runtime: ChatRuntime, can_continue: Callable[[list], bool]):
    """Show a checked file (`read_import`): its chat, system message and settings."""

    def load_file(picked: dict | None):
        if picked is None:
            return (gr.skip(),) * (7 + len(PARAMETER_ORDER))
        return loaded_conversation(runtime, Transcript(**picked), can_continue)

    return load_file


def loaded_conversation_outputs(controls: ChatControls) -> list:
    """What a loaded conversation (an import, a conversation link) sets: see loaded_conversation."""
    chat = controls.chat
    shown = [chat.chatbot, chat.chatbot_state, chat.chatbot_value, chat.conversation_id]
    return [*shown, controls.system_box, controls.preset, *controls.sliders, controls.continue_row]


def loaded_conversation(runtime: ChatRuntime, transcript: Transcript, can_continue: Callable[[list], bool]):
    """A checked conversation as a new chat: shown, in the history states, with its system
    message, preset and settings; continue offered if its last reply was cut."""
    if transcript.model and transcript.model != runtime.model_name:
        gr.Info(f"This conversation was with {transcript.model}; it goes on with {runtime.model_name}.")
    settings = settings_for_context(transcript.settings, runtime.context_length)
    sliders = [settings.get(name, gr.skip()) for name in PARAMETER_ORDER]
    messages = transcript.messages
    preset = preset_for(transcript.system_message)
    # A new conversation (id None), shown, in the history states, and saved next.
    shown = (messages, messages, messages, None)
    return *shown, transcript.system_message, preset, *sliders, gr.Row(visible=can_continue(messages))


def settings_for_context(settings: dict[str, float], context_length: int) -> dict[str, float]:
    """A loaded chat's settings as this page's sliders can hold them: max new tokens within what
    this context allows (a chat exported or shared at 8,192 tokens, loaded where it is 300)."""
    most = max_new_tokens_limit(context_length).high
    if settings.get("max_new_tokens", 0) <= most:
        return settings
    gr.Info(
        f"Max new tokens {settings['max_new_tokens']:g} is more than this context allows; it is {most:g}."
    )
    return {**settings, "max_new_tokens": most}


def add_engine_panel(runtime: ChatRuntime) -> None:
    """For the Space's owner: which engine serves, its load, tok/s, memory; refreshed while open."""
    with gr.Accordion("Engine", open=False) as panel:
        figures = gr.Markdown("", elem_id="engine-panel")
    timer = gr.Timer(ENGINE_REFRESH_S, active=False)
    # Quietly: gradio dims an output while its event runs, which every 2 s would be a flicker.
    private = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
    panel.expand(lambda: (engine_markdown(runtime), gr.Timer(active=True)), None, [figures, timer], **private)
    panel.collapse(lambda: gr.Timer(active=False), None, [timer], **private)
    timer.tick(lambda: engine_markdown(runtime), None, [figures], **private)
