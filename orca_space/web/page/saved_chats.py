"""The sidebar of saved chats, beyond what gr.ChatInterface's `save_history` list offers.

ChatInterface lists the chats saved in the browser (a `gr.Dataset` of titles) and deletes one only
by the trash icon above an open chat, for good. Here each row gets its own delete, undone from a
line that appears under the list; the open chat's row is marked (`aria-current`), and on a phone
the sidebar folds away once a chat is picked, its toggle kept on screen.

The rows are drawn by gradio's Dataset, so the delete buttons and the mark are added in the
browser (`SIDEBAR_HEAD`), which knows which row was pressed; the server does the deleting, on
ChatInterface's own states (`saved_conversations`, `conversation_id`), and tells the browser
which chat is open through a hidden number (`#open-chat`).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .prompt_view import markdown_literal

PRIVATE = {"queue": False, "api_visibility": "private"}
# Which row's delete was pressed: set by the browser's click handler, read by the event's js.
PRESSED_ROW_JS = "(index, saved, open_id, shown) => [window.orcaChatToDelete ?? -1, saved, open_id, shown]"
SHOW_OPEN_CHAT_JS = "(index) => { window.orcaOpenChat = index; window.orcaMarkOpenChat?.(); }"


@dataclass
class SidebarParts:
    open_chat: gr.Number  # which saved chat is open (-1: none), for the browser's mark
    deleted: gr.State  # the last deleted chat, for undo: {"index", "conversation", "was_open"}
    undo_row: gr.Column
    undo_note: gr.Markdown


def add_saved_chat_controls(chat: gr.ChatInterface) -> SidebarParts:
    """Inside the sidebar, under ChatInterface's list: the undo line and the hidden parts the
    browser's delete buttons and mark talk through; wired to ChatInterface's events."""
    with gr.Column(visible=False, elem_id="undo-delete") as undo_row:
        undo_note = gr.Markdown("", elem_id="undo-note")
        undo = gr.Button("Undo", size="sm", scale=0, elem_id="undo-delete-button")
    to_delete = gr.Number(-1, visible="hidden", elem_id="chat-to-delete", precision=0)
    delete = gr.Button("Delete the chat", visible="hidden", elem_id="delete-chat")
    open_chat = gr.Number(-1, visible="hidden", elem_id="open-chat", precision=0)
    parts = SidebarParts(open_chat, gr.State(None), undo_row, undo_note)

    shown = [chat.saved_conversations, chat.conversation_id, chat.chatbot, chat.chatbot_state]
    delete.click(
        lambda index, saved, open_id, history: delete_chat(chat, index, saved, open_id, history),
        [to_delete, chat.saved_conversations, chat.conversation_id, chat.chatbot],
        [*shown, parts.deleted, undo_row, undo_note],
        js=PRESSED_ROW_JS,
        **PRIVATE,
    )
    undo.click(
        undo_delete,
        [parts.deleted, chat.saved_conversations, chat.conversation_id, chat.chatbot],
        [*shown, parts.deleted, undo_row],
        **PRIVATE,
    )
    follow_open_chat(chat, open_chat)
    return parts


def follow_open_chat(chat: gr.ChatInterface, open_chat: gr.Number) -> None:
    """Keep `#open-chat` on the open chat's row: after every save or delete (the list changed),
    a picked row, a new chat. The browser marks the row on each change."""
    chat.saved_conversations.change(open_index, [chat.conversation_id], [open_chat], **PRIVATE)
    chat.chat_history_dataset.click(lambda index: index, [chat.chat_history_dataset], [open_chat], **PRIVATE)
    chat.new_chat_button.click(lambda: -1, None, [open_chat], **PRIVATE)
    open_chat.change(None, [open_chat], None, js=SHOW_OPEN_CHAT_JS, **PRIVATE)


def open_index(conversation_id: int | None) -> int:
    return -1 if conversation_id is None else conversation_id


def delete_chat(chat: gr.ChatInterface, index, saved, open_id, history):
    """Delete saved chat `index`; if it was open, the chat empties as for a new one. The undo
    line names it."""
    saved = list(saved or [])
    if not isinstance(index, (int, float)) or not 0 <= int(index) < len(saved):
        return (gr.skip(),) * 7  # a stale row (the list changed under the click): nothing to do
    index = int(index)
    conversation = saved.pop(index)
    was_open = open_id == index
    if was_open:
        open_id, history = None, []
    elif open_id is not None and open_id > index:
        open_id -= 1
    deleted = {"index": index, "conversation": conversation, "was_open": was_open}
    note = f"Deleted “{markdown_literal(chat._generate_chat_title(conversation))}”."
    shown_history = history if was_open else gr.skip()
    return saved, open_id, shown_history, shown_history, deleted, gr.Column(visible=True), note


def undo_delete(deleted, saved, open_id, history):
    """Put the last deleted chat back where it was; reopen it if it was open and nothing else
    has been opened or typed since."""
    if not deleted:
        return (*(gr.skip(),) * 4, None, gr.Column(visible=False))
    saved = list(saved or [])
    index = min(deleted["index"], len(saved))
    saved.insert(index, deleted["conversation"])
    reopen = deleted["was_open"] and open_id is None and not history
    if reopen:
        open_id, history = index, deleted["conversation"]
    elif open_id is not None and open_id >= index:
        open_id += 1
    shown_history = history if reopen else gr.skip()
    return saved, open_id, shown_history, shown_history, None, gr.Column(visible=False)


# At most this wide, the sidebar covers the page (gradio's own breakpoint, 768 px).
PHONE_MEDIA = "(max-width: 768px)"

SIDEBAR_CSS = """
/* gradio's Dataset stripes every second row, which in a list of chats read as "selected". */
#conversations tr.tr-body { background: none; }
#conversations tr.tr-body td { position: relative; padding-right: var(--size-8); text-align: left; }
#conversations tr.tr-body:hover td { background: var(--background-fill-primary); }
#conversations tr.open-chat td { background: var(--color-accent-soft); font-weight: 600;
  box-shadow: inset 3px 0 0 var(--color-accent); }
#conversations .delete-chat { position: absolute; right: var(--size-1); top: 50%;
  transform: translateY(-50%); border: none; background: none; cursor: pointer;
  padding: var(--size-1); border-radius: var(--radius-sm); color: var(--body-text-color-subdued); }
#conversations .delete-chat:hover, #conversations .delete-chat:focus-visible {
  color: var(--body-text-color); background: var(--background-fill-secondary); }
#undo-delete { gap: var(--spacing-sm); }
#undo-note p { margin: 0; font-size: var(--text-sm); }

/* Phones: the toggle a whole tab on screen, beside (not over) the title. */
@media (max-width: 768px) {
  #conversations:not(.open) .toggle-button { left: calc(100% + var(--size-1));
    border-left: 1px solid var(--border-color-primary); border-radius: var(--radius-md); }
  #conversations.open .toggle-button { right: var(--size-1);
    border-left: 1px solid var(--border-color-primary); border-radius: var(--radius-md); }
  #page-header { padding-left: var(--size-8); }
}
"""

TRASH_ICON = (
    '<svg aria-hidden="true" width="14" height="14" viewBox="0 0 24 24" fill="none" stroke="currentColor" '
    'stroke-width="2" stroke-linecap="round" stroke-linejoin="round"><path d="M3 6h18"/>'
    '<path d="M8 6V4h8v2"/><path d="M19 6l-1 14H6L5 6"/><path d="M10 11v6"/><path d="M14 11v6"/></svg>'
)

# Delete buttons on each row, the open chat's mark, and folding the sidebar after a pick on a
# phone. Rows are redrawn by gradio whenever the list changes: an observer puts both back.
SIDEBAR_HEAD = f"""
<script>
(() => {{
  const TRASH_ICON = `{TRASH_ICON}`;
  const rows = () => [...document.querySelectorAll("#conversations tr.tr-body")];
  const markAndDecorate = () => {{
    rows().forEach((row, index) => {{
      const cell = row.querySelector("td");
      if (!cell) return;
      const title = cell.innerText.trim();
      let button = cell.querySelector(".delete-chat");
      if (!button) {{
        button = document.createElement("button");
        button.type = "button";
        button.className = "delete-chat";
        button.innerHTML = TRASH_ICON;  // no text: the row's text stays the chat's title
        cell.appendChild(button);
      }}
      const name = `Delete chat: ${{title}}`;
      if (button.getAttribute("aria-label") !== name) button.setAttribute("aria-label", name);
      if (button.title !== "Delete this chat") button.title = "Delete this chat";
      const open = index === window.orcaOpenChat;
      if (row.classList.contains("open-chat") !== open) row.classList.toggle("open-chat", open);
      if (open && row.getAttribute("aria-current") !== "true") row.setAttribute("aria-current", "true");
      if (!open && row.hasAttribute("aria-current")) row.removeAttribute("aria-current");
    }});
  }};
  window.orcaOpenChat = -1;
  window.orcaMarkOpenChat = markAndDecorate;
  const onPhone = () => window.matchMedia("{PHONE_MEDIA}").matches;
  const foldOnPhone = () => setTimeout(() => {{
    const sidebar = document.querySelector("#conversations");
    if (onPhone() && sidebar?.classList.contains("open")) sidebar.querySelector(".toggle-button")?.click();
  }}, 0);
  document.addEventListener("click", (event) => {{
    const deleteButton = event.target.closest?.("#conversations .delete-chat");
    if (deleteButton) {{
      // Before the row's own handler, which would open the chat being deleted.
      event.stopPropagation();
      event.preventDefault();
      window.orcaChatToDelete = rows().indexOf(deleteButton.closest("tr"));
      document.querySelector("#delete-chat")?.click();
      return;
    }}
    if (event.target.closest?.("#conversations tr.tr-body")) foldOnPhone();
    if (event.target.closest?.("#conversations button.primary")) foldOnPhone();  // New chat
  }}, true);
  new MutationObserver(markAndDecorate).observe(document.documentElement, {{
    subtree: true, childList: true,
  }});
}})();
</script>
"""
