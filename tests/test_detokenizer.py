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


def byte_piece(value: int) -> int:
    """The id of SentencePiece's byte-fallback piece <0xVV> (after <unk>, <s> and </s>)."""
    return 3 + value


def test_text_after_an_invalid_byte_keeps_streaming_before_finalize(tokenizer):
    """A model can emit a byte that starts no character; what follows must not wait for the end."""
    hello = tokenizer("hello world", add_special_tokens=False).input_ids
    for bad in ([byte_piece(0x80)], [byte_piece(0xF0), byte_piece(0x9F)]):  # stray continuation, cut start
        ids = bad + hello
        detok = StreamingDetokenizer(tokenizer)
        for token in ids:
            detok.add_token(token)
        assert detok.text.endswith("hello world"), f"text after {bad} must stream, got {detok.text!r}"
        assert detok.finalize() == "", "nothing was left to flush"
        assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stream_that_ends_halfway_through_a_character_flushes_it_at_finalize(tokenizer):
    hello = tokenizer("hello world", add_special_tokens=False).input_ids
    whale = tokenizer("🐋", add_special_tokens=False).input_ids
    ids = hello + whale[:-2]  # the last two of the emoji's four bytes never come
    detok = StreamingDetokenizer(tokenizer)
    shown = [detok.add_token(token) for token in ids]
    assert REPLACEMENT_CHAR not in "".join(shown), "half a character is held back while the stream runs"
    assert "".join(shown) == "hello world "
    tail = detok.finalize()
    assert tail and set(tail) == {REPLACEMENT_CHAR}, "the end of the reply says a character was cut"
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True), "the whole reply, as one decode"
    assert detok.last_segment == tail


def test_last_segment_is_what_the_latest_call_returned(tokenizer):
    detok = StreamingDetokenizer(tokenizer)
    assert detok.last_segment == "", "nothing streamed yet"
    for token in tokenizer("a 🐋 b", add_special_tokens=False).input_ids:
        segment = detok.add_token(token)
        assert detok.last_segment == segment
    assert detok.finalize() == detok.last_segment == ""
    detok.add_token(tokenizer("x", add_special_tokens=False).input_ids[-1])
    detok.reset()
    assert detok.last_segment == "" and detok.text == "", "reset forgets the last segment too"


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call was given."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.decoded_lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.decoded_lengths.append(len(ids))
        return self._tokenizer.decode(ids, **kwargs)


def test_each_token_decodes_a_short_window_not_the_whole_reply(tokenizer):
    """Decoding everything so far for every token is quadratic: a 4,000-token reply would stall."""
    ids = tokenizer("hello world, streaming along " * 20, add_special_tokens=False).input_ids
    counting = CountingTokenizer(tokenizer)
    detok = StreamingDetokenizer(counting)
    for token in ids:
        detok.add_token(token)
    detok.finalize()
    assert len(ids) > 100 and max(counting.decoded_lengths) <= 4, max(counting.decoded_lengths)
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)


def split_on_a_token_boundary(tokenizer, shown: str, new_text: str) -> tuple[list[int], list[int]]:
    """The ids of `shown`, and the ids the model would write after it for `new_text`."""
    head = tokenizer(shown, add_special_tokens=False).input_ids
    whole = tokenizer(shown + new_text, add_special_tokens=False).input_ids
    assert whole[: len(head)] == head, "the setup: the split falls on a token boundary"
    return head, whole[len(head) :]


def test_a_primed_detokenizer_keeps_the_space_before_a_continuations_first_word(tokenizer):
    """Continue: the reply so far is on screen already, and its last tokens are the context the new
    ones decode in. Decoded alone, a continuation that starts a new word would glue it on."""
    shown, tail = split_on_a_token_boundary(tokenizer, "Orcas are", " apex predators.")
    alone, _ = stream(tokenizer, tail)
    assert "".join(alone) == "apex predators.", "the setup: without the context the space is lost"
    detok = StreamingDetokenizer(tokenizer)
    detok.prime(shown)
    segments = [detok.add_token(token) for token in tail] + [detok.finalize()]
    assert segments[0].startswith(" "), f"the first new word keeps its space, got {segments[0]!r}"
    assert "".join(segments) == detok.text == " apex predators.", "only the new text, none of the primed"
    assert detok.tokens == shown + tail


def test_priming_a_used_detokenizer_starts_over_from_the_primed_tokens(tokenizer):
    """Nothing of an earlier stream may leak into the continuation: not its text, not its offsets."""
    shown, tail = split_on_a_token_boundary(tokenizer, "Line one.", "\nLine two 🐋.")
    detok = StreamingDetokenizer(tokenizer)
    for token in tokenizer(
        "an earlier, longer reply that was streamed before", add_special_tokens=False
    ).input_ids:
        detok.add_token(token)
    detok.prime(shown)
    assert detok.text == "" and detok.last_segment == "", "the primed text is not shown again"
    segments = [detok.add_token(token) for token in tail] + [detok.finalize()]
    assert "".join(segments) == detok.text == "\nLine two 🐋.", "exactly the continuation"
    assert not any(REPLACEMENT_CHAR in s for s in segments), "half a character is never shown"
