"""Refusals through gradio (the page and the MCP tool): the reason in words, and one line in the log.

gradio prints the whole traceback of any exception an event raises, gr.Error included, unless it
was made with `print_exception=False` (`queueing.py`: `if not isinstance(e, Error) or
e.print_exception: traceback.print_exc()`), so every refused message put some 30 lines in the
console. A message too long, a slider out of range or a file that is no conversation is the
user's doing, not the server's: `refusal` makes the gr.Error without a traceback and logs the
reason in one line. Anything else an event raises, a bug, keeps its traceback.
"""

from __future__ import annotations

import logging

import gradio as gr

from ..params import PARAMETER_ORDER
from ..transcript import short_label

log = logging.getLogger(__name__)


def refusal(reason: str, level: int = logging.INFO) -> gr.Error:
    """The gr.Error to raise for `reason`, logged once here (WARNING for what is not the user's
    doing, such as a failed engine, whose own log has the details)."""
    log.log(level, "refused: %s", reason)
    return gr.Error(reason, print_exception=False)


def in_page_words(reason: str) -> str:
    """The chat service names a parameter as the code does ("max_new_tokens (600) must be below
    the context length"); the page names it as its slider does ("Max new tokens (600) ...")."""
    for name in PARAMETER_ORDER:
        if reason.startswith(name):
            return short_label(name) + reason[len(name) :]
    return reason
