"""Sharing a conversation by link, on the chat page: the panel that makes a link, and a link's
conversation coming back as a new chat.

"Create a link" stores a snapshot of the chat as it is now (`sharing.links`) and shows the
link to copy and, this once, its delete token, which the browser also keeps (`link_scripts`)
so that the link's page (`link_page`) offers to delete it there. "Continue" on a link's page
comes back here as `/?continue=ID`: the conversation goes through the import's checks and
becomes a new chat, with its system message and settings; like any new chat, it is saved in
the browser's conversations once a message is sent.

Words: a *conversation link* shows one conversation; gradio's `--share` makes a public link
to the whole app. The page never calls the one by the other's name.
"""

from __future__ import annotations

import json
from urllib.parse import urljoin, urlsplit

import gradio as gr

from ...params import PARAMETER_ORDER
from ...runtime import ChatRuntime
from ...sharing.links import ConversationLinks
from ...sharing.store import LinkError
from ..refusals import refusal
from . import link_scripts
from .panels import ChatControls, loaded_conversation, loaded_conversation_outputs
from .replying import page_client

LINK_PATH = "shared"  # a link is /shared?id=ID (the link page's route)
PANEL_LABEL = "Share by link"
# Sharing is a quick write to SQLite: its own small group of workers, not the chat's slots.
LINK_EVENTS = {"concurrency_id": "conversation-links", "concurrency_limit": 8, "api_visibility": "private"}
NOT_HERE = "This conversation is not here (deleted, or the link is wrong)."


PANEL_NOTE = (
    "Anyone who has the link (and this app's login, if it has one) can read this conversation "
    "as it is now, without what you add later, and carry it on in a chat of their own. Links "
    "cannot be guessed or listed. Not to be confused with the app's public link (`--share`)."
)


def add_share_panel(page: gr.Blocks, runtime: ChatRuntime, controls: ChatControls) -> None:
    """The panel under the chat, and continuing a link's conversation (see the module docstring);
    nothing when the app keeps no conversation links."""
    links = runtime.links
    if links is None:
        return
    chat = controls.chat
    with gr.Accordion(PANEL_LABEL, open=False, elem_id="share-panel"):
        gr.Markdown(PANEL_NOTE)
        create = gr.Button("🔗 Create a link to this conversation", size="sm", elem_id="create-link")
        with gr.Group(visible=False) as made:
            link_box = gr.Textbox(
                label="Link to this conversation", buttons=["copy"], interactive=False, elem_id="link-url"
            )
            token_box = gr.Textbox(
                label="Delete token: shown only now (this browser keeps it too)",
                buttons=["copy"],
                interactive=False,
                elem_id="link-token",
            )
        page_base, kept, continue_id = (gr.Textbox(visible=False) for _ in range(3))
    private = {"queue": False, "api_visibility": "private"}
    page.load(None, None, [page_base], js=link_scripts.PAGE_BASE_JS, **private)
    create.click(
        make_share(runtime, links),
        [chat.chatbot, controls.system_box, *controls.sliders, page_base],
        [made, link_box, token_box, kept],
        show_progress="minimal",
        **LINK_EVENTS,  # queued: a refusal's gr.Error shows its sentence in a toast
    ).success(None, [kept], None, js=link_scripts.REMEMBER_JS, **private)
    # A hidden box set from the address, so that the server is asked only when there is an id.
    page.load(None, None, [continue_id], js=link_scripts.CONTINUE_ID_JS, **private)
    continue_id.change(
        make_continue_from_link(runtime, links, controls),
        [continue_id],
        loaded_conversation_outputs(controls),
        show_progress="hidden",
        **LINK_EVENTS,
    )


def make_share(runtime: ChatRuntime, links: ConversationLinks):
    def share(request: gr.Request, history, system_message, *values):
        *parameters, page_base = values
        settings = dict(zip(PARAMETER_ORDER, parameters, strict=True))
        try:
            link = links.share(
                history or [], system_message or "", settings, runtime.model_name, visitor(runtime, request)
            )
        except LinkError as exc:
            raise refusal(f"No link was made: {exc}.") from None
        kept = json.dumps({"id": link.id, "token": link.delete_token, "created": link.created_at})
        return gr.Group(visible=True), link_url(page_base, link.id), link.delete_token, kept

    return share


def make_continue_from_link(runtime: ChatRuntime, links: ConversationLinks, controls: ChatControls):
    skip_all = (gr.skip(),) * len(loaded_conversation_outputs(controls))

    def continue_from_link(link_id: str):
        if not link_id:
            return skip_all
        try:
            shared = links.open(link_id)
        except LinkError as exc:
            raise refusal(f"Could not open the shared conversation: {exc}.") from None
        if shared is None:
            raise refusal(NOT_HERE)
        gr.Info("The shared conversation is now a chat of your own: send a message to carry it on.")
        return loaded_conversation(runtime, shared.transcript, controls.can_continue)

    return continue_from_link


def link_url(page_base: object, link_id: str) -> str:
    """The link as the browser will open it: beside the chat page (`page_base`, which the
    browser reports); relative when the page's address is missing or not http(s)."""
    path = f"{LINK_PATH}?id={link_id}"
    if not isinstance(page_base, str) or urlsplit(page_base).scheme not in ("http", "https"):
        return f"./{path}"
    return urljoin(page_base, path)


def visitor(runtime: ChatRuntime, request: gr.Request | None) -> str:
    """Whom the links-per-hour limit counts: the address, as the chat's rate limit reads it."""
    return "unknown" if request is None else page_client(runtime, request)
