"""Streaming detokenization that never shows half a character.

SentencePiece byte-fallback splits an emoji or a CJK character over several tokens; decoding
a partial sequence yields U+FFFD. Decoding each token alone also loses the spaces that
SentencePiece attaches to the following piece. So the decoder keeps a short window of recent
tokens, decodes it with and without the newest ones, and emits only the grown suffix once the
text no longer ends in a replacement character. Joined segments equal `decode(all_tokens)`.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self._prefix_offset = 0  # start of the context window that is decoded again
        self._read_offset = 0  # tokens before this were already emitted as text
        self.text = ""
        self.last_segment = ""

    def prime(self, tokens: list[int]) -> None:
        """Take `tokens` as text already shown (the end of a reply being continued): the next
        token decodes in their context, so a word's leading space survives, and none of their
        text is emitted again."""
        self.reset()
        self.tokens = list(tokens)
        self._read_offset = len(self.tokens)

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=True)

    def add_token(self, token: int) -> str:
        """Add one token; return (and keep in `last_segment`) the text it completes, maybe ''."""
        self.tokens.append(token)
        window = self.tokens[self._prefix_offset :]
        settled = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        current = self._decode(window)
        segment = ""
        if len(current) > len(settled) and not current.endswith(REPLACEMENT_CHAR):
            segment = current[len(settled) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.tokens)
        self._emit(segment)
        return segment

    def finalize(self) -> str:
        """Flush what is still held back (a dangling partial character decodes as U+FFFD)."""
        settled = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        current = self._decode(self.tokens[self._prefix_offset :])
        segment = current[len(settled) :]
        self._prefix_offset = self._read_offset = len(self.tokens)
        self._emit(segment)
        return segment

    def _emit(self, segment: str) -> None:
        self.last_segment = segment
        self.text += segment
