"""Tokens' log-probabilities in OpenAI's two shapes: chat's `logprobs.content` list, and text
completions' parallel `tokens` / `token_logprobs` / `top_logprobs` lists.

The engine sends each token's id with its log-probability and alternatives
(`engines.requests.TokenLogprobs`), from the distribution it was drawn from (see
`engines.sampling.sample_next_tokens`). Here ids become the tokens' own text: SentencePiece's
`▁` a space, a byte token (`<0x0A>`) its byte, with `bytes` for clients that join partial
characters. A token cut from the distribution (by top-k, top-p or min-p) has probability 0:
its log-probability, -infinity, is written as -9999.0, as vLLM writes it, since JSON has no
infinity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from ...engines.requests import TokenLogprobs
from .openai_schema import TEXT, Shape

NO_PROBABILITY = -9999.0
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
Entries = Sequence[tuple[int, TokenLogprobs]]


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else NO_PROBABILITY


class LogprobWriter:
    """Writes a choice's new tokens' log-probabilities in the answer's shape."""

    def __init__(self, shape: Shape, tokenizer) -> None:
        self.text_completion = shape is TEXT
        self.token_text = lru_cache(maxsize=4096)(lambda token: token_text(tokenizer, token))

    def write(self, entries: Entries) -> dict[str, Any]:
        return self._text(entries) if self.text_completion else self._chat(entries)

    def _chat(self, entries: Entries) -> dict[str, Any]:
        def item(token: int, logprob: float) -> dict[str, Any]:
            text, raw = self.token_text(token)
            return {"token": text, "logprob": finite(logprob), "bytes": list(raw)}

        content = [
            {**item(token, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
            for token, lp in entries
        ]
        return {"content": content, "refusal": None}

    def _text(self, entries: Entries) -> dict[str, Any]:
        return {
            "tokens": [self.token_text(token)[0] for token, _ in entries],
            "token_logprobs": [finite(lp.logprob) for _, lp in entries],
            "top_logprobs": [{self.token_text(t)[0]: finite(v) for t, v in lp.top} for _, lp in entries],
        }


def token_text(tokenizer, token: int) -> tuple[str, bytes]:
    """A token as text, and its bytes: `▁` is a space; a byte token is that byte (shown as U+FFFD
    when it is part of a longer character, whose bytes clients join)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if (byte := _BYTE_TOKEN.fullmatch(piece)) is not None:
        raw = bytes([int(byte.group(1), 16)])
        return raw.decode("utf-8", errors="replace"), raw
    text = piece.replace("▁", " ")
    return text, text.encode("utf-8")
