"""ChatML prompts, built from token ids so that no text a user types can forge a turn.

The official template renders `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message and
`<|im_start|>assistant\\n` for the reply. Tokenizing that rendered string would turn any
`<|im_start|>` a user typed into the real control token. Here each message's text is encoded
with control-token matching switched off and the control ids are placed around it by hand,
so they appear exactly where the template puts them and nowhere else.

For ordinary text the result equals `tokenizer(rendered_template_text).input_ids` (with its
leading BOS): in that one-shot encode each span between two control tokens is tokenized on its
own without the leading `▁` a standalone SentencePiece encode adds, and `PlainTextEncoder`
reproduces exactly that.

Continuing a reply ("continue" after max new tokens) leaves the last assistant turn open:
`<|im_start|>assistant\\n{reply so far}` with no `<|im_end|>` and no new reply header, as the
template renders with `continue_final_message=True`. The engine just sees a longer prompt.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ControlIds:
    im_start: int
    im_end: int
    bos: int | None
    eos: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ControlIds:
        im_start, im_end = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
        unk = tokenizer.unk_token_id
        if im_start in (None, unk) or im_end in (None, unk):
            raise ValueError(f"tokenizer lacks the ChatML tokens {IM_START} and {IM_END}")
        return cls(im_start, im_end, tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("</s>"))

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a reply: end of turn, a new turn, or SentencePiece's `</s>`."""
        return frozenset(i for i in (self.im_end, self.im_start, self.eos) if i is not None)


class PlainTextEncoder:
    """Encodes text as the spans between control tokens are encoded, control strings included.

    Works on a private copy of the fast tokenizer's pipeline: `encode_special_tokens` makes
    `<|im_start|>`, `</s>` and `<s>` in the text ordinary characters, and a Metaspace
    pre-tokenizer that prepends `▁` to the first piece of each call is told not to, because
    in a one-shot encode no span after a control token gets that `▁`.
    """

    def __init__(self, tokenizer) -> None:
        backend = copy.deepcopy(tokenizer.backend_tokenizer)
        backend.encode_special_tokens = True
        backend.no_truncation()
        backend.no_padding()
        _never_prepend_space(backend)
        self._backend = backend

    def __call__(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids


def _never_prepend_space(backend) -> None:
    from tokenizers import pre_tokenizers

    pre = backend.pre_tokenizer
    if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=pre.replacement, prepend_scheme="never", split=pre.split
        )


class ChatEncoder:
    """Turns `[{"role", "content"}, ...]` into the prompt ids of the official template."""

    def __init__(self, tokenizer) -> None:
        self.controls = ControlIds.from_tokenizer(tokenizer)
        self._encode_text = PlainTextEncoder(tokenizer)
        self._newline = self._encode_text("\n")
        self._reply_header = [self.controls.im_start, *self._encode_text("assistant\n")]
        self._control_ids = {IM_START: self.controls.im_start, IM_END: self.controls.im_end}
        if self.controls.bos is not None:
            self._control_ids[tokenizer.bos_token] = self.controls.bos
        self._bos_pieces = (
            [] if self.controls.bos is None else [PromptPiece(tokenizer.bos_token, control=True)]
        )

    def encode_message(self, role: str, content: str) -> list[int]:
        """`<|im_start|>{role}\\n{content}<|im_end|>\\n` as ids; its length is the turn's cost."""
        check_message(role, content)
        body = self._encode_text(f"{role}\n{content}")
        return [self.controls.im_start, *body, self.controls.im_end, *self._newline]

    @property
    def prefix(self) -> list[int]:
        return [] if self.controls.bos is None else [self.controls.bos]

    @property
    def reply_header(self) -> list[int]:
        """`<|im_start|>assistant\\n`: the generation prompt."""
        return list(self._reply_header)

    def open_turn(self, partial_reply: str) -> list[int]:
        """`<|im_start|>assistant\\n{partial_reply}` with no `<|im_end|>`: a reply the model goes
        on with. Its length is what the open turn costs in a continuation's prompt."""
        return [self.controls.im_start, *self._encode_text(f"assistant\n{partial_reply}")]

    def encode_chat(self, messages: Sequence[Mapping[str, str]], continue_last: bool = False) -> list[int]:
        """Prompt ids, BOS first. With `continue_last` the last message (the assistant's) stays
        open, as the official template renders it with `continue_final_message=True`; otherwise
        the reply header follows the messages."""
        ids: list[int] = []
        for piece in self.prompt_pieces(messages, continue_last):
            ids += [self._control_ids[piece.text]] if piece.control else self._encode_text(piece.text)
        return ids

    def prompt_pieces(
        self, messages: Sequence[Mapping[str, str]], continue_last: bool = False
    ) -> list[PromptPiece]:
        """What `encode_chat` encodes, piece by piece, BOS included: the prompt as text."""
        return [*self._bos_pieces, *chat_pieces(messages, continue_last)]


def check_message(role: object, content: object) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(content, str):
        raise ValueError(f"content of a {role} message must be text, got {type(content).__name__}")


@dataclass(frozen=True)
class PromptPiece:
    """A run of prompt text: a control token (`control`) or plain text, which never holds one."""

    text: str
    control: bool = False


def chat_pieces(messages: Sequence[Mapping[str, str]], continue_last: bool = False) -> list[PromptPiece]:
    """The prompt as the template renders it (after the BOS), split into control tokens and text.

    `ChatEncoder.encode_chat` encodes exactly these pieces, so the text shown as "the prompt"
    is the text the ids stand for. Continuing, the open reply is kept as it is, trailing
    whitespace included, as transformers 5's `continue_final_message` renders it.
    """
    pieces: list[PromptPiece] = []
    if continue_last:
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("only a conversation that ends with an assistant message can be continued")
        *closed, open_reply = messages
    else:
        closed, open_reply = list(messages), None
    for message in messages:
        check_message(message["role"], message["content"])
    for message in closed:
        pieces += [
            PromptPiece(IM_START, control=True),
            PromptPiece(f"{message['role']}\n{message['content']}"),
            PromptPiece(IM_END, control=True),
            PromptPiece("\n"),
        ]
    reply_so_far = "" if open_reply is None else open_reply["content"]
    return [*pieces, PromptPiece(IM_START, control=True), PromptPiece(f"assistant\n{reply_so_far}")]


def encode_chat(tokenizer, messages: Sequence[Mapping[str, str]], continue_last: bool = False) -> list[int]:
    """Prompt ids for `messages` followed by the assistant's generation prompt (or, with
    `continue_last`, with the last assistant message left open), BOS first."""
    return ChatEncoder(tokenizer).encode_chat(messages, continue_last)
