"""What the page may keep in a `gr.State`, and where gradio keeps it. Every such rule is here.

gradio 6.31 handles a session's states in ways that constrain their values:
- before and after every event whose outputs include a state with a `.change` listener, it
  hashes that state (`Blocks.get_state_ids_to_track` -> `utils.deep_hash`), to know whether to
  fire `.change`. `deep_hash` walks dicts, lists and tuples, and hands anything else that claims
  to be hashable to `hash()`: a frozen dataclass claims so, and raises `TypeError` as soon as it
  holds a dict or a list. That error comes before the event's function runs, so the reply never
  comes (issue #21: the prompt view, once it named a left-out turn, silenced every later message);
- it deep-copies a state's initial value into each new session.

So the page's states hold plain data only: dicts with text keys, lists, tuples, text, numbers,
booleans and None (`is_plain_data`). Code that wants a richer type converts at the state's edge
(`PromptView.as_state` / `from_state`). `session_states` lets the tests check the rule on the
states of a real session after a long conversation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

PLAIN_SCALARS = (str, int, float, bool, type(None))


def is_plain_data(value: Any) -> bool:
    """Whether `value` is plain data that gradio can hash, compare and copy (see above)."""
    if isinstance(value, PLAIN_SCALARS):
        return True
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain_data(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain_data(item) for item in value)
    return False


def session_states(page: gr.Blocks) -> Iterator[tuple[str, str, Any]]:
    """(session hash, state's label, value) for every state that a session of `page` holds now,
    as gradio's StateHolder keeps them (a state shows up once an event has set or read it)."""
    holder = page.state_holder
    with holder.lock:
        sessions = list(holder.session_data.items())
    for session_hash, session in sessions:
        for block_id, value in list(session.state_data.items()):
            block = session.blocks_config.blocks.get(block_id)
            yield session_hash, f"{type(block).__name__} {block_id}", value
