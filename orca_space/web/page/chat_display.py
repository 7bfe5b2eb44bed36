"""How the page draws a conversation: one set of Chatbot settings for every place that shows one.

The chat and the read-only view of a conversation link (`link_page`) both build their Chatbot
here, so that Markdown, code and LaTeX look the same in both, and whatever keeps a message's
text from running as HTML or script, or making the browser fetch anything, in one keeps it so in
the other: every message goes to the browser as written and comes back so
(`send_messages_as_written`), a user's as typed (`typed_message`), a reply's Markdown rendered
but its raw HTML and pictures as text (`reply_markdown`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import gradio as gr

from .reply_markdown import LATEX_DELIMITERS, shown_reply, written_reply
from .typed_message import shown_message, written_message

# Marks the page's chatbots, whose messages go to the browser as written (send_messages_as_written).
AS_WRITTEN = "as-written"
# What a conversation looks like and how safe it is to show; the callers add only their layout.
DISPLAY_OPTIONS: dict[str, Any] = {
    "latex_delimiters": LATEX_DELIMITERS,
    "sanitize_html": True,
    "render_markdown": True,
    "buttons": ["copy", "copy_all"],
}


def conversation_chatbot(**layout: Any) -> gr.Chatbot:
    """A Chatbot that draws messages as the chat does; `layout` sets its place and size
    (label, height, elem_id...), never how messages are drawn."""
    if drawn := set(layout) & set(DISPLAY_OPTIONS):
        raise ValueError(f"layout must not change how messages are drawn: {', '.join(sorted(drawn))}")
    send_messages_as_written()
    classes = class_list(layout.pop("elem_classes", None))
    return gr.Chatbot(**DISPLAY_OPTIONS, **layout, elem_classes=[*classes, AS_WRITTEN])


@functools.cache
def send_messages_as_written() -> None:
    """Send every message of a chatbot marked AS_WRITTEN to the browser as written, a user's as
    typed and a reply's raw HTML as text, and take the chat the browser sends back (the next
    turn's history) as written.

    gradio's Chatbot passes text content through `inspect.cleandoc` on its way out (the first
    line's indentation, a common indentation and trailing blank lines dropped, tabs made spaces),
    and the browser sends that back, so from the second turn on the model saw changed messages.
    Text given as a typed part is sent as it is. A reply's text goes out through `shown_reply`
    and comes back through `written_reply`, its exact inverse; a user's through `shown_message`
    and `written_message`.

    The class's methods are wrapped, not one chatbot's: gradio rebuilds a session's chatbot from
    its constructor arguments whenever an event sets one of its properties
    (`Blocks.postprocess_data`: `block.__class__(**kwargs)`, as when a saved conversation is
    opened), and the rebuilt one keeps its `elem_classes`, so the mark, but nothing else.
    """
    send, receive = gr.Chatbot.postprocess, gr.Chatbot.preprocess

    @functools.wraps(send)
    def postprocess(self: gr.Chatbot, value):
        if value is not None and shows_as_written(self):
            value = [message_as_shown(message) for message in value]
        return send(self, value)

    @functools.wraps(receive)
    def preprocess(self: gr.Chatbot, payload):
        messages = receive(self, payload)
        return [message_as_written(m) for m in messages] if shows_as_written(self) else messages

    gr.Chatbot.postprocess, gr.Chatbot.preprocess = postprocess, preprocess


def shows_as_written(chatbot: gr.Chatbot) -> bool:
    return AS_WRITTEN in class_list(chatbot.elem_classes)


def class_list(classes: str | list[str] | None) -> list[str]:
    """gradio's `elem_classes` (one name, a list, or None) as a list."""
    return [classes] if isinstance(classes, str) else list(classes or [])


def message_as_shown(message: object) -> object:
    """A history message with its text as typed parts, through `shown_reply` (a reply) or
    `shown_message` (anyone else's)."""
    if not isinstance(message, dict) or "content" not in message:
        return message  # gradio's own message objects: none on this page
    show = shown_reply if message.get("role") == "assistant" else shown_message
    content = message["content"]
    if isinstance(content, str):
        return {**message, "content": {"type": "text", "text": show(content)}}
    if isinstance(content, list):
        return {**message, "content": [text_part(part, show) for part in content]}
    return message


def text_part(part: object, show: Callable[[str], str]) -> object:
    if isinstance(part, str):
        return {"type": "text", "text": show(part)}
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return {**part, "text": show(part["text"])}
    return part


def message_as_written(message: dict) -> dict:
    """A message from the browser, its text parts through `written_reply` (a reply) or
    `written_message`."""
    written = written_reply if message.get("role") == "assistant" else written_message
    return {**message, "content": [text_part(part, written) for part in message["content"]]}
