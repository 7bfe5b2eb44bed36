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

    def encode_message(self, role: str, content: str) -> list[int]:
        """`<|im_start|>{role}\\n{content}<|im_end|>\\n` as ids; its length is the turn's cost."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"content of a {role} message must be text, got {type(content).__name__}")
        body = self._encode_text(f"{role}\n{content}")
        return [self.controls.im_start, *body, self.controls.im_end, *self._newline]

    @property
    def prefix(self) -> list[int]:
        return [] if self.controls.bos is None else [self.controls.bos]

    @property
    def reply_header(self) -> list[int]:
        """`<|im_start|>assistant\\n`: the generation prompt."""
        return list(self._reply_header)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        ids = list(self.prefix)
        for message in messages:
            ids += self.encode_message(message["role"], message["content"])
        return ids + self._reply_header


def encode_chat(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt ids for `messages` followed by the assistant's generation prompt, BOS first."""
    return ChatEncoder(tokenizer).encode_chat(messages)
