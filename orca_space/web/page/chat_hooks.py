"""Where the page reaches inside gradio 6.31's `gr.ChatInterface`. Every such place is here.

ChatInterface owns the chat's history and wires retry, undo, edit, saved conversations and the
`/chat` API itself. The page needs a few things it does not offer, each done here on the events
and components it builds, and each guarded by a test in tests/test_ui.py that fails if a gradio
upgrade moves what it relies on:

- after an error its clean-up steps never run (`recover_from_errors`);
- a stopped reply must say "stopped": its spinning note is settled in the step that copies the
  chatbot into the history state after every reply (`settle_after_replies`), and on screen by a
  step of the page's own after each reply step (`after_each_reply`);
- the `/chat` API must keep answering text, not the page's reply-plus-notes (`answer_api_in_text`);
- the saved-conversations column belongs in a sidebar that folds away on phones (`move_history_to`);
- the page's own changes to the chat (continue, import) are saved as ChatInterface saves its own
  (`save_step`), and its continue button hides on ChatInterface's events (`chat_changing_triggers`);
- the textbox's placeholder, which ChatInterface blanks for each reply, comes back after it
  (`MESSAGE_PLACEHOLDER`, `placeholder_back`).
"""

from __future__ import annotations

import functools

import gradio as gr

from ...reply_stats import reply_text, settle, settled_after_failure
from .chat_display import text_part

REPLY_STEP = "_submit_fn"  # ChatInterface's name for the page's reply steps
MESSAGE_PLACEHOLDER = "Type a message…"


def chat_state_syncs(page: gr.Blocks, chat: gr.ChatInterface) -> list:
    """ChatInterface's steps that copy the shown chat into its history states (after a reply,
    undo, clear, a loaded conversation...)."""
    inputs, outputs = [chat.chatbot._id], [chat.chatbot_state._id, chat.chatbot_value._id]
    return [
        block_fn
        for block_fn in page.fns.values()
        if [b._id for b in block_fn.inputs] == inputs and [b._id for b in block_fn.outputs] == outputs
    ]


def settle_after_replies(page: gr.Blocks, chat: gr.ChatInterface) -> None:
    """A stopped reply's note stops spinning and says "stopped", in the chat's history.

    A stop closes the reply generator, which can yield nothing more, and leaves the chat as the
    last update showed it. ChatInterface then always runs its sync step (chatbot -> history
    states), stop or not; settling in that step, rather than in a step of our own that would
    race it, gives the history and the saved conversation the settled notes. (Its output
    states do not redraw the chat: gradio's front end fires `change` for states set by queued
    events only, and the sync is not queued. `after_each_reply` redraws it.)
    """
    for block_fn in chat_state_syncs(page, chat):
        block_fn.fn = settled_copies


def settled_copies(shown: list) -> tuple[list, list]:
    settled = settle(shown or [])
    return settled, settled


def reply_steps(page: gr.Blocks, chat: gr.ChatInterface) -> list:
    """ChatInterface's reply steps (after a submit, retry, edit, example or option) as
    dependencies to chain more steps on."""
    return [
        gr.events.Dependency(chat.textbox, {}, dependency_id, block_fn.fn)
        for dependency_id, block_fn in page.fns.items()
        # Only the UI's reply steps: the API endpoint has no chat on screen.
        if getattr(block_fn.fn, "__name__", "") == REPLY_STEP
    ]


def after_each_reply(
    page: gr.Blocks, chat: gr.ChatInterface, fn, outputs: list, extra_steps: list, takes_chat: bool = True
) -> None:
    """Run `fn(shown chat)` (`fn()` without `takes_chat`: the browser then sends no chat) after
    every reply step, finished or stopped (gradio runs `.then` steps after a stop too);
    `extra_steps` are the page's own reply steps (continue)."""
    inputs = [chat.chatbot] if takes_chat else None
    for step in [*reply_steps(page, chat), *extra_steps]:
        step.then(fn, inputs, outputs, queue=False, api_visibility="private")


def recover_from_errors(page: gr.Blocks, chat: gr.ChatInterface, extra_steps: list | None = None) -> None:
    """Hand the textbox back when a reply fails with gr.Error.

    ChatInterface re-enables its textbox in `.then()` steps, but gradio 6.31's front end runs
    only `.failure()` triggers after an error, so without this the chat stays locked behind a
    stop button until the page is reloaded. The handler does what those skipped steps do; the
    failed message stays in the chat, where retry and edit work on it. `extra_steps` are the
    page's own reply steps (continue) that need the same.

    On a stop, gradio's front end dispatches this step and the `.then` steps at once, and the
    one whose answer comes back last draws the chat. So both settle a spinning note the same
    way, as "stopped", and a reply that fails settles its own note ("ended by an error") in its
    last update before raising (`replying.failures_said`); whichever step wins, the chat is
    the same. A step that failed before its function could show anything (inside gradio) left
    the user's message bare: this step adds the note saying so (`settled_after_failure`).
    """
    for step in [*reply_steps(page, chat), *(extra_steps or [])]:
        step.failure(
            restore_after_failure,
            [chat.chatbot],
            [chat.chatbot_state, chat.chatbot, chat.textbox],
            queue=False,
            api_visibility="undocumented",
        )


def restore_after_failure(shown_history: list):
    settled = settled_after_failure(shown_history or [])
    return settled, settled, unlocked_textbox()


def locked_textbox() -> gr.Textbox:
    """The textbox while a reply streams: no typing, a stop button."""
    return gr.Textbox(interactive=False, submit_btn=False, stop_btn=True)


def unlocked_textbox() -> gr.Textbox:
    return gr.Textbox(interactive=True, submit_btn=True, stop_btn=False, placeholder=MESSAGE_PLACEHOLDER)


def placeholder_back() -> gr.Textbox:
    """After a reply: ChatInterface blanks the placeholder when a message is sent and never puts
    it back, so from the first reply on the empty textbox said nothing."""
    return gr.Textbox(placeholder=MESSAGE_PLACEHOLDER)


def answer_api_in_text(page: gr.Blocks, api_name: str = "chat") -> None:
    """The `/chat` API answers the reply's text, as before the page drew notes under replies.

    Both the page and the API endpoint call the same reply function, which yields the reply
    with its notes; the API step's output goes through `reply_text`, and updates that carry
    only a note (waiting for the model) are not sent: an API caller just waits.
    """
    api_steps = [block_fn for block_fn in page.fns.values() if block_fn.api_name == api_name]
    assert len(api_steps) == 1, f"expected one /{api_name} endpoint, found {len(api_steps)}"
    step = api_steps[0]
    stream = step.fn

    @functools.wraps(stream)  # keeps the signature gradio reads the API's parameters from
    async def text_only(*args, **kwargs):
        async for response, *rest in stream(*args, **kwargs):
            text = reply_text(response)
            if text is not None:
                yield (text, *rest)

    text_only.answers_text = True  # for the test that this wrapping survives gradio upgrades
    step.fn = text_only


def move_history_to(sidebar: gr.Sidebar, chat: gr.ChatInterface) -> None:
    """Put ChatInterface's saved-conversations column (new chat button and list) in `sidebar`,
    so that on a phone the chat comes first and the list folds away."""
    column = chat.new_chat_button.parent
    assert chat.chat_history_dataset.parent is column, "ChatInterface's history column has changed"
    column.unrender()
    with sidebar:
        column.render()


def save_step(chat: gr.ChatInterface, fn=None) -> dict:
    """Keyword arguments for a step that saves the chat in the browser as ChatInterface does after
    each turn: `fn(conversation_id, history, saved)` (its own by default) -> (id, saved)."""
    return {
        "fn": fn or chat._save_conversation,
        "inputs": [chat.conversation_id, chat.chatbot_state, chat.saved_conversations],
        "outputs": [chat.conversation_id, chat.saved_conversations],
    }


def save_conversation(chat: gr.ChatInterface):
    """ChatInterface's own save, for a step of the page's."""
    return chat._save_conversation


def as_chat_interface_keeps(history: list) -> list:
    """Messages as ChatInterface keeps them, each content a list of typed parts: the page's own
    messages hold plain text, and ChatInterface's list of saved conversations reads the parts
    (`_generate_chat_title`; a saved import with plain text made it raise)."""
    return [
        {**message, "content": [text_part(part, str) for part in content_parts(message["content"])]}
        if isinstance(message, dict) and "content" in message
        else message
        for message in history
    ]


def content_parts(content: object) -> list:
    return content if isinstance(content, list) else [content]


def chat_changing_triggers(chat: gr.ChatInterface) -> list:
    """The events by which ChatInterface changes the chat: a message, retry, edit, undo, clear, an
    example or option, a new chat, a saved conversation opened."""
    return [
        chat.textbox.submit,
        chat.chatbot.retry,
        chat.chatbot.edit,
        chat.chatbot.undo,
        chat.chatbot.clear,
        chat.chatbot.example_select,
        chat.chatbot.option_select,
        chat.new_chat_button.click,
        chat.chat_history_dataset.click,
    ]
