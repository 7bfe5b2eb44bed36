"""Fit a conversation into the context by whole turns.

The prompt must leave room for the reply: the budget is the context length minus max new
tokens. The system message and the newest user message always stay; then the newest whole
turns (a user message with the assistant reply that answered it) are kept while they fit, and
everything older is dropped, so the model never sees half a turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Message = dict  # {"role": str, "content": str}


@dataclass(frozen=True)
class FittedChat:
    messages: list[Message]  # system, kept turns, new user message, in prompt order
    prompt_tokens: int
    dropped_turns: int


class PromptTooLong(ValueError):
    """The system message plus the new message alone do not fit the budget."""


def group_turns(history: Sequence[Message]) -> list[list[Message]]:
    """Split alternating history into turns, each starting at a user message."""
    turns: list[list[Message]] = []
    for message in history:
        if message["role"] == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


def fit_history(
    system: Message | None,
    history: Sequence[Message],
    new_user: Message,
    budget: int,
    message_cost: Callable[[Message], int],
    fixed_cost: int,
) -> FittedChat:
    """Keep the system message, the newest turns that fit, and the new user message.

    `message_cost(m)` is the number of prompt tokens message `m` adds, and `fixed_cost` the
    tokens every prompt carries (BOS, the reply header): ChatML costs add up per message.
    """
    required = [m for m in (system,) if m is not None]
    used = fixed_cost + sum(message_cost(m) for m in required) + message_cost(new_user)
    if used > budget:
        raise PromptTooLong(
            f"the message needs {used} tokens with the system message, but only {budget} fit "
            "(context length minus max new tokens); shorten it or lower max new tokens"
        )
    turns = group_turns(history)
    kept: list[list[Message]] = []
    for turn in reversed(turns):
        cost = sum(message_cost(m) for m in turn)
        if used + cost > budget:
            break
        kept.append(turn)
        used += cost
    kept.reverse()
    messages = required + [m for turn in kept for m in turn] + [new_user]
    return FittedChat(messages, used, dropped_turns=len(turns) - len(kept))
