"""The page a conversation link opens: `/shared?id=ID`, the conversation read-only, drawn as the
chat draws it, with one button to carry it on as a chat of one's own.

A second page of the same gradio app (`Blocks.route`), not a route beside it: so it is behind
the app's login (`--auth`) exactly as the chat is, and its events go through gradio's queue and
its checks. The snapshot is checked again as it is read (`sharing.snapshot`); its messages are
shown by a Chatbot built like the chat's (`chat_display`), so no text in it runs as HTML or
script where the chat's would not. An unknown, deleted or expired id, or a store that cannot
be read, is a sentence on the page, never a broken one.
"""

from __future__ import annotations

from datetime import UTC, datetime

import gradio as gr

from ...runtime import ChatRuntime
from ...sharing.links import ConversationLinks, SharedConversation
from ...sharing.store import LinkError
from ...transcript import settings_sentence
from ..refusals import refusal
from . import link_scripts
from .chat_display import conversation_chatbot
from .prompt_view import markdown_literal
from .share_panel import LINK_EVENTS, LINK_PATH, NOT_HERE

PAGE_NAME = "Shared conversation"
DELETED = "Deleted: this link no longer opens the conversation, for anyone."
EMPTY_TOKEN = "Paste the link's delete token first: whoever made the link was shown it then."
WRONG_TOKEN = "That delete token is not this link's (or the link is already gone)."
READ_ONLY = "read-only-chat"
# gradio's Chatbot always offers to clear it; on a read-only page that would only blank the view.
LINK_PAGE_CSS = f"""
#chatbot.{READ_ONLY} .top-panel button[aria-label="Clear"] {{ display: none; }}
"""


def add_link_page(page: gr.Blocks, runtime: ChatRuntime) -> None:
    """Add the link page to `page` (after its own `with` block has closed, as gradio requires);
    nothing when the app keeps no conversation links."""
    links = runtime.links
    if links is None:
        return
    with page:  # the chat page: no navigation bar for a page that is reached only by links
        gr.Navbar(visible="hidden")
    with page.route(PAGE_NAME, LINK_PATH, show_in_navbar=False):
        gr.Navbar(visible="hidden")  # "hidden", not False: gradio 6.31 shows the bar for False
        header = gr.Markdown(elem_id="link-header")
        # elem_id "chatbot", as the chat's, so the page's CSS draws notes the same way (the two
        # are never in one document); a reader starts at the first message, not the last.
        chatbot = conversation_chatbot(
            label=PAGE_NAME,
            show_label=False,
            height="60vh",
            autoscroll=False,
            elem_id="chatbot",
            elem_classes=[READ_ONLY],
        )
        with gr.Row():
            carry_on = gr.Button(
                "Continue this conversation in a new chat ▸",
                variant="primary",
                visible=False,
                elem_id="continue-link",
            )
            gr.Button("Open the chat", link="./", elem_id="open-chat")
        with gr.Accordion("System message and settings", open=False, visible=False) as details:
            system_box = gr.Textbox(label="System message", interactive=False, lines=2, max_lines=8)
            settings_line = gr.Markdown()
        with gr.Accordion(
            "Delete this link", open=False, visible=False, elem_id="delete-panel"
        ) as delete_panel:
            gr.Markdown("Whoever made the link got its delete token; the browser that made it fills it in.")
            token = gr.Textbox(label="Delete token", elem_id="delete-token")
            delete = gr.Button("🗑 Delete this link", variant="stop", size="sm", elem_id="delete-link")
        private = {"queue": False, "api_visibility": "private"}
        shown = [header, chatbot, carry_on, details, system_box, settings_line, delete_panel]
        page.load(make_open_link(links), None, shown, **private).then(
            None, None, [token], js=link_scripts.KEPT_TOKEN_JS, **private
        ).then(lambda kept: gr.Accordion(open=bool(kept)), [token], [delete_panel], **private)
        delete.click(make_delete_link(links), [token], shown, **LINK_EVENTS).success(
            None, js=link_scripts.FORGET_JS, **private
        )


def make_open_link(links: ConversationLinks):
    def open_link(request: gr.Request):
        link_id = request.query_params.get("id", "")
        try:
            shared = links.open(link_id)
        except LinkError as exc:
            return gone(f"## Conversation links are unavailable right now\n{exc}.")
        if shared is None:
            return gone(f"## {NOT_HERE}")
        transcript = shared.transcript
        return (
            header_markdown(shared),
            transcript.messages,
            gr.Button(visible=True, link=f"./?{link_scripts.CONTINUE_PARAM}={shared.id}"),
            gr.Accordion(visible=True),
            transcript.system_message,
            settings_markdown(transcript.settings),
            gr.Accordion(visible=True),
        )

    return open_link


def make_delete_link(links: ConversationLinks):
    def delete_link(request: gr.Request, token: str):
        if not isinstance(token, str) or not token.strip():
            raise refusal(EMPTY_TOKEN)
        try:
            deleted = links.delete(request.query_params.get("id", ""), token)
        except LinkError as exc:
            raise refusal(f"The link was not deleted: {exc}.") from None
        if not deleted:
            raise refusal(WRONG_TOKEN)
        return gone(f"## {DELETED}")

    return delete_link


def gone(header: str):
    """The page without a conversation: only the header says why."""
    hidden = gr.Accordion(visible=False)
    return header, [], gr.Button(visible=False), hidden, "", "", hidden


def header_markdown(shared: SharedConversation) -> str:
    model = markdown_literal(shared.transcript.model) or "an unnamed model"
    when = f"Shared {day_and_time(shared.created_at)}"
    if shared.expires_at is not None:
        when += f", until {day_and_time(shared.expires_at)}"
    return (
        "## 🐋 A shared conversation\n"
        f"{when}, with {model}. Read-only: continue it to carry it on in a chat of your own "
        "(this link does not change)."
    )


def settings_markdown(settings: dict[str, float]) -> str:
    return f"Settings: {settings_sentence(settings) or 'the defaults'}."


def day_and_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
