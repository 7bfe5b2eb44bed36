"""A message the chat service would refuse never joins the chat.

ChatInterface moves a sent message out of the textbox and into the chat before the reply
function runs, so a message refused there (too long, only spaces) left the box empty and the
chat with a bubble whose reply only said "ended by an error", the reason in a toast that faded.
gradio's validator runs before any of that: a message it refuses stays in the box, and the
reason stays under it until the text changes. A counter under the box shows the limit as the
text nears it, counted in the browser (no round trip per keystroke).
"""

from __future__ import annotations

import json

import gradio as gr

from ...chat import check_text
from ...runtime import ChatRuntime
from ..refusals import refusal

COUNTER_FROM = 0.8  # the counter shows once a message is this share of the limit


def message_validator(runtime: ChatRuntime):
    """ChatInterface's `validator`: the chat service's own checks of a new message (its
    characters, and its tokens once the model's tokenizer is there)."""

    def validate(message: object) -> dict:
        reason = refused_because(runtime, message)
        if reason is not None:
            refusal(reason)  # the one log line a refusal gets
        return gr.validate(reason is None, reason or "")

    return validate


def refused_because(runtime: ChatRuntime, message: object) -> str | None:
    """Why the chat would refuse `message`, as a sentence for the page; None if it would not."""
    try:
        if runtime.service is not None:
            runtime.service.check_message(message)
        else:  # still loading: the characters can be counted already, the tokens not yet
            check_text("message", message, runtime.max_message_chars, allow_empty=False)
    except ValueError as exc:
        return page_sentence(str(exc))
    return None


def page_sentence(reason: str) -> str:
    """ "message is 20,000 characters; the limit is 16,000" -> "This message is 20,000 characters;
    the limit is 16,000. Shorten it to send it." (and so on for the other reasons)."""
    if reason == "message is empty":
        return "Type a message to send: this one is empty or only spaces."
    if reason.startswith("message is "):
        return f"This {reason}. Shorten it to send it."
    return reason[:1].upper() + reason[1:] + "."


def counter_js(limit: int, show_from: float = COUNTER_FROM) -> str:
    """The counter's text for the box's text, in the browser: empty until the text is
    `show_from` of `limit`, then "12,800 / 16,000 characters", and how many too many past it."""
    return f"""
(text) => {{
  const limit = {json.dumps(limit)};
  const length = [...(text ?? "")].length;
  if (length < limit * {json.dumps(show_from)}) return "";
  const format = (n) => n.toLocaleString("en-US");
  const count = `${{format(length)}} / ${{format(limit)}} characters`;
  return length > limit ? `${{count}}: ${{format(length - limit)}} too many` : count;
}}
"""


def add_message_counter(textbox: gr.Textbox, limit: int) -> gr.Markdown:
    """A quiet line under the message box that counts towards the limit (see `counter_js`)."""
    counter = gr.Markdown("", elem_id="message-count")
    textbox.change(None, [textbox], [counter], js=counter_js(limit), queue=False, api_visibility="private")
    return counter
