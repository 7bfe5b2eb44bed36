"""Round trip: the joined streamed segments equal one decode of all tokens, with no U+FFFD shown."""

from __future__ import annotations

import pytest

from orca_space.detokenizer import REPLACEMENT_CHAR, StreamingDetokenizer

TEXTS = [
    "hello\nworld",
    "Hello world, how are you?",
    "emoji 🐋🌊👩‍👩‍👧‍👦 🇫🇷 end",
    "中文字符，日本語のテキスト、한국어 텍스트",
    "  two leading spaces\n\n\ttab",
    "mixed: naïve café — “quotes” … ∑∫√ ≠ ∞",
    "```python\nprint('x')\n```",
]


def stream(tokenizer, ids):
    detok = StreamingDetokenizer(tokenizer)
    segments = [detok.add_token(i) for i in ids]
    segments.append(detok.finalize())
    return segments, detok


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    segments, detok = stream(tokenizer, ids)
    assert "".join(segments) == tokenizer.decode(ids, skip_special_tokens=True)
    assert detok.text == "".join(segments)
    assert not any(REPLACEMENT_CHAR in s for s in segments), "half a character must never be shown"


def test_multibyte_characters_are_held_back_until_complete(tokenizer):
    ids = tokenizer("🐋", add_special_tokens=False).input_ids
    assert len(ids) > 1, "the whale emoji is spelled in byte-fallback tokens"
    segments, _ = stream(tokenizer, ids)
    assert "".join(segments) == "🐋"
    assert sum(bool(s) for s in segments) == 1, "the emoji appears once, whole"


def test_control_tokens_never_show(tokenizer):
    ids = tokenizer("hi", add_special_tokens=False).input_ids + [32000, 32001, 1, 2]
    segments, _ = stream(tokenizer, ids)
    assert "".join(segments) == "hi"


def test_reset_starts_over(tokenizer):
    detok = StreamingDetokenizer(tokenizer)
    for i in tokenizer("abc", add_special_tokens=False).input_ids:
        detok.add_token(i)
    detok.reset()
    assert detok.text == "" and detok.tokens == []
