"""What the "prompt of the last reply" panel shows. Pure: no gradio.

The exact ChatML sent for a reply, after history fitting: the encoder's own pieces (what its
ids stand for, `ChatEncoder.prompt_pieces`), control tokens marked as such so that a
`<|im_start|>` typed in a message (plain text to the model) looks different from the real one;
the prompt's token count against the budget (context length minus max new tokens); and the
turns that were left out to fit.

The page keeps the view in a `gr.State` as plain data (`as_state`, read back by `from_state`):
gradio hashes such states after every event, and a dataclass holding dicts cannot be hashed
(see `page_state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...chat import PreparedChat
from ...chatml import ChatEncoder, PromptPiece
from ...history import Message

CONTROL_LABEL = "control token"
PREVIEW_CHARS = 100  # of each left-out message
NO_PROMPT_YET = "No reply yet: send a message, and the prompt it was answered from appears here."


@dataclass(frozen=True)
class PromptView:
    pieces: tuple[PromptPiece, ...]
    prompt_tokens: int
    context_length: int
    max_new_tokens: int
    left_out: tuple[Message, ...] = ()
    continued: bool = False  # the prompt went on with a reply instead of starting one

    @property
    def budget(self) -> int:
        """Tokens the prompt may use: what the context leaves after room for the reply."""
        return self.context_length - self.max_new_tokens

    @property
    def text(self) -> str:
        return "".join(piece.text for piece in self.pieces)

    def as_state(self) -> dict[str, Any]:
        """The view as plain data (dicts, lists, text, numbers), for the page's gr.State."""
        return {
            "pieces": [[piece.text, piece.control] for piece in self.pieces],
            "prompt_tokens": self.prompt_tokens,
            "context_length": self.context_length,
            "max_new_tokens": self.max_new_tokens,
            "left_out": [{"role": m["role"], "content": m["content"]} for m in self.left_out],
            "continued": self.continued,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> PromptView | None:
        """The view `as_state` made, or None when there is none yet."""
        if state is None:
            return None
        return cls(
            pieces=tuple(PromptPiece(text, control) for text, control in state["pieces"]),
            prompt_tokens=state["prompt_tokens"],
            context_length=state["context_length"],
            max_new_tokens=state["max_new_tokens"],
            left_out=tuple(dict(message) for message in state["left_out"]),
            continued=state["continued"],
        )


def prompt_view(encoder: ChatEncoder, chat: PreparedChat, context_length: int) -> PromptView:
    return PromptView(
        pieces=tuple(encoder.prompt_pieces(chat.messages, chat.continues_reply)),
        prompt_tokens=chat.prompt_tokens,
        context_length=context_length,
        max_new_tokens=chat.params.max_new_tokens,
        left_out=chat.left_out,
        continued=chat.continues_reply,
    )


def highlighted(view: PromptView | None) -> list[tuple[str, str | None]]:
    """The prompt as (text, label) spans for gr.HighlightedText: control tokens labelled."""
    if view is None:
        return []
    return [(piece.text, CONTROL_LABEL if piece.control else None) for piece in view.pieces]


def summary_markdown(view: PromptView | None) -> str:
    if view is None:
        return NO_PROMPT_YET
    share = view.prompt_tokens / view.budget if view.budget > 0 else 1.0
    budget = (
        f"**{view.prompt_tokens:,} of {view.budget:,} tokens** ({share:.0%}) for the prompt: the "
        f"{view.context_length:,}-token context minus {view.max_new_tokens:,} max new tokens."
    )
    lines = [budget]
    if view.continued:
        lines.append("The last reply was continued: its turn is left open, with no `<|im_end|>`.")
    lines.append(left_out_markdown(view.left_out))
    return "\n\n".join(lines)


def left_out_markdown(left_out: tuple[Message, ...]) -> str:
    if not left_out:
        return "Every earlier turn fits: none was left out."
    turns = sum(message["role"] == "user" for message in left_out) or 1
    lines = [f"Left out to fit, oldest first ({turns} turn{'' if turns == 1 else 's'}):"]
    lines += [f"- **{message['role']}**: {preview(message['content'])}" for message in left_out]
    return "\n".join(lines)


def preview(text: str) -> str:
    """A message's start on one line, with Markdown's special characters shown as typed."""
    flat = " ".join(text.split())
    short = flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"
    return markdown_literal(short) or "(empty)"


def markdown_literal(text: str) -> str:
    """`text` shown as typed in Markdown: its special characters escaped."""
    return "".join(f"\\{char}" if char in MARKDOWN_SPECIALS else char for char in text)


MARKDOWN_SPECIALS = set("\\`*_{}[]()#+-.!|<>~")
