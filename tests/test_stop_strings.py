"""The stop-string matcher: cuts before the first stop string, however the text is split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orca_space.stop_strings import StopStringMatcher


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """What generation one character at a time would give: stop as soon as a stop string is complete."""
    for end in range(len(text) + 1):
        done = [stop for stop in stops if text[:end].endswith(stop)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


def run(pieces: list[str], stops: list[str]) -> tuple[list[str], str, bool]:
    matcher = StopStringMatcher(stops)
    shown = [matcher.feed(piece) for piece in pieces]
    return shown, "".join(shown) + matcher.flush(), matcher.stopped


def test_a_stop_string_split_across_pieces_is_never_shown_in_part():
    shown, text, stopped = run(["Hello <|", "im_", "end|> more"], ["<|im_end|>"])
    assert shown == ["Hello ", "", ""], "the start of a possible stop string is held back"
    assert (text, stopped) == ("Hello ", True)


def test_held_text_that_turns_out_not_to_stop_is_shown():
    shown, text, stopped = run(["a <|", "im fine"], ["<|im_end|>"])
    assert shown == ["a ", "<|im fine"] and (text, stopped) == ("a <|im fine", False)
    assert run(["ends with <|im"], ["<|im_end|>"])[1] == "ends with <|im", "flush gives back the held tail"


def test_the_first_stop_to_complete_wins():
    assert run(["xabcy"], ["abc", "b"])[1] == "xa", "'b' completes before 'abc' does"
    assert run(["xabc"], ["bc", "abc"])[1] == "x", "ending together, the longer one is cut"
    assert run(["one. two. three"], [". t", "three"])[1] == "one"


def test_nothing_after_a_stop():
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.feed("a\n\nb") == "a" and matcher.stopped
    assert matcher.feed("more") == "" and matcher.flush() == ""


def test_no_stops_passes_everything_through():
    assert run(["ab", "", "c"], [])[0] == ["ab", "", "c"]


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher(["ok", ""])


alphabet = st.sampled_from("ab<|>\n é🐋")
texts = st.text(alphabet, max_size=30)
stop_lists = st.lists(st.text(alphabet, min_size=1, max_size=5), max_size=4)


@settings(max_examples=300, deadline=None)
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(0, 30), max_size=8))
def test_any_split_gives_what_character_by_character_generation_gives(text, stops, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    shown, joined, stopped = run(pieces, stops)
    assert (joined, stopped) == reference_cut(text, stops)
    so_far = ""
    for piece in shown:
        so_far += piece
        assert not any(stop in so_far for stop in stops), "text with a stop string in it was shown"
