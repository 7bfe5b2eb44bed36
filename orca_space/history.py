"""Fit a conversation into the context by whole turns, dropping old ones in steps.

The prompt must leave room for the reply: the budget is the context length minus max new
tokens. The system message and the newest user message always stay, and the model never sees
half a turn (a user message with the assistant reply that answered it).

Once a conversation no longer fits, dropping the single oldest turn each time would change the
prompt's start on every turn, and the engine could reuse nothing of the previous turn's KV cache
(`engines/prefix_cache.py`). So turns are dropped in steps: when the prompt does not fit, enough
of the oldest turns go that a quarter of the budget is free again (`HEADROOM`), and the start
then stays put for the next few turns, until those fill the room. The cost: right after a step
the model sees up to a quarter of the budget less history than it could.

The page sends the whole conversation every turn and the server remembers nothing of it, so the
step must follow from the conversation alone: `stable_start` replays every earlier turn's fit
(each turn's prompt was the turns before it plus its user message) with today's budget, and so
finds the same start the previous turns had.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Message = dict  # {"role": str, "content": str}
HEADROOM = 0.25  # of the budget, left free when turns are dropped (see the module docstring)


@dataclass(frozen=True)
class FittedChat:
    messages: list[Message]  # system, kept turns, new user message, in prompt order
    prompt_tokens: int
    dropped_turns: int


class PromptTooLong(ValueError):
    """The system message plus the new message alone do not fit the budget: the prompt needs
    `needed` tokens where `budget` (the context less the new tokens) fit."""

    def __init__(self, message: str, needed: int = 0, budget: int = 0):
        super().__init__(message)
        self.needed, self.budget = needed, budget


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
    open_cost: int = 0,
) -> FittedChat:
    """Keep the system message, the turns from `stable_start` on, and the new user message.

    `message_cost(m)` is the number of prompt tokens message `m` adds, and `fixed_cost` the
    tokens every prompt carries (BOS, the reply header): ChatML costs add up per message.
    `open_cost` is what this prompt alone carries after the new user message (the text of a
    reply it continues): the earlier turns' prompts, replayed for the start, did not.
    """
    required = [m for m in (system,) if m is not None]
    base = fixed_cost + sum(message_cost(m) for m in required)
    new_cost = message_cost(new_user)
    needed = base + new_cost + open_cost
    if needed > budget:
        raise PromptTooLong(
            f"the message needs {needed} tokens with the system message, but only {budget} fit "
            "(context length minus max new tokens); shorten it or lower max new tokens",
            needed=needed,
            budget=budget,
        )
    turns = group_turns(history)
    costs = [[message_cost(m) for m in turn] for turn in turns]  # each message tokenized once
    turn_costs = [sum(turn) for turn in costs]
    # Each earlier turn's own new message: its first (it starts with the user's, see group_turns).
    asked = [turn[0] for turn in costs] + [new_cost]
    start = stable_start(turn_costs, asked, base, budget, open_cost)
    messages = required + [m for turn in turns[start:] for m in turn] + [new_user]
    used = base + sum(turn_costs[start:]) + new_cost + open_cost
    return FittedChat(messages, used, dropped_turns=start)


def stable_start(
    turn_costs: Sequence[int], asked: Sequence[int], base: int, budget: int, open_cost: int = 0
) -> int:
    """How many of the oldest turns to leave out, replaying every turn's fit from the first.

    At turn k the prompt held `base` tokens, the kept turns before k and the message asked
    then (`asked[k]`; the last entry is today's). The start stays while that fits `budget`;
    when not, it moves to the first turn that leaves `HEADROOM` of the budget free (or, when
    the message asked is too long for that, the first that fits at all). A continue of today's
    reply (`open_cost` more tokens) keeps the start its turn had while the reply fits there.
    """
    ends = [0]  # ends[k]: tokens of turns [0, k)
    for cost in turn_costs:
        ends.append(ends[-1] + cost)

    def first_fitting(start: int, k: int, extra: int, limit: float) -> int | None:
        for candidate in range(start, k + 1):
            if base + ends[k] - ends[candidate] + asked[k] + extra <= limit:
                return candidate
        return None

    def moved(start: int, k: int, extra: int = 0) -> int:
        """Turn k's start (its prompt `extra` tokens longer), the turn before it having `start`."""
        if base + ends[k] - ends[start] + asked[k] + extra <= budget:
            return start
        roomy = first_fitting(start, k, extra, budget * (1 - HEADROOM))
        if roomy is not None:
            return roomy
        fitting = first_fitting(start, k, extra, budget)
        return fitting if fitting is not None else k

    start = 0
    for k in range(len(asked)):
        start = moved(start, k)
    return moved(start, len(asked) - 1, open_cost) if open_cost else start
