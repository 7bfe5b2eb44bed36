"""How the page draws a conversation: one set of Chatbot settings for every place that shows one.

The chat and the read-only view of a conversation link (`link_page`) both build their Chatbot
here, so that Markdown, code and LaTeX look the same in both, and whatever keeps a message's
text from running as HTML or script in one keeps it so in the other.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]
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
    return gr.Chatbot(**DISPLAY_OPTIONS, **layout)
