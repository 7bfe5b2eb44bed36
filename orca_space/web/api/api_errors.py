"""The chat service's refusals in the API's words: the field a message is about, the limit under
the name the client sent (`max_tokens` or `max_completion_tokens`), and a prompt too long for
the context with what it holds (a front end's tools take most of it without its user knowing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...chat import ChatService
from ...history import PromptTooLong
from .output_rules import OutputRules

if TYPE_CHECKING:
    from .openai_requests import Conversation


def too_long_message(
    exc: PromptTooLong, service: ChatService, rules: OutputRules, limit_name: str | None
) -> str:
    """The refusal in the API's words: what the prompt takes (the tools' part of it, which a
    front end adds without its user knowing), what the reply needs, and what to change
    (`limit_name`: the token limit the client sent, None when it sent none)."""
    context = service.limits.context_length
    reply = context - exc.budget
    tools = ""
    fixes = ["fewer or shorter messages"]
    if suffix := rules.system_suffix():
        tokens = len(service.encoder.encode_message("system", suffix))
        tools = f" ({len(rules.tools)} tools' descriptions take about {tokens:,} of them)"
        fixes.append("fewer tools")
    if limit_name:
        fixes.append(f"a lower {limit_name}")
    choices = ", ".join(fixes[:-1]) + " or " + fixes[-1] if len(fixes) > 1 else fixes[0]
    return (
        f"the prompt takes {exc.needed:,} tokens{tools} and the reply needs room for {reply:,} at least; "
        f"the context holds {context:,}. Send {choices}"
    )


def in_api_words(message: str, param: str) -> str:
    """The chat service's "max_new_tokens (600) must be below the context length" under the name
    the client sent: "max_tokens (600) ..." (or max_completion_tokens)."""
    internal = "max_new_tokens"
    return param + message[len(internal) :] if message.startswith(internal) else message


def error_param(message: str, conversation: Conversation, limit_name: str) -> str:
    """The OpenAI field that a chat service error is about (its messages start with the name)."""
    if message.startswith("max_new_tokens"):
        return limit_name
    if message.startswith("message "):
        return f"messages[{conversation.message_index}].content"
    return "messages"
