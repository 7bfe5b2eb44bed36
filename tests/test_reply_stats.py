"""The line under each reply and the page's notes in the chat history."""

from __future__ import annotations

import pytest

from orca_space.replies import ReplyStats
from orca_space.reply_stats import (
    STOPPED_WAITING,
    ReplyFigures,
    is_note,
    last_reply_figures,
    read_figures,
    reply_message,
    reply_text,
    settle,
    stats_note,
    waiting_note,
    without_notes,
)

FINISHED = ReplyStats(prompt_tokens=30, tokens=42, first_token_s=0.1234, decode_s=1.3, finish_reason="stop")


def test_figures_come_from_the_engines_stats():
    figures = ReplyFigures.from_stats(FINISHED)
    assert figures.tokens == 42 and figures.first_token_s == pytest.approx(0.1234)
    assert figures.tokens_per_s == pytest.approx(41 / 1.3), "the decode rate, tokens after the first"
    assert figures.summary() == "42 tokens · first token 123 ms · 31.5 tok/s"
    assert figures.ending == "stop"


@pytest.mark.parametrize(
    "figures, line",
    [
        (ReplyFigures(tokens=1, first_token_s=2.25), "1 token · first token 2.2 s"),
        (ReplyFigures(tokens=0), "0 tokens"),
        (
            ReplyFigures(tokens=5000, first_token_s=0.05, tokens_per_s=170.4),
            "5,000 tokens · first token 50 ms · 170 tok/s",
        ),
        (ReplyFigures(tokens=80, tokens_per_s=9.96, parts=2), "80 tokens in 2 parts · 10.0 tok/s"),
    ],
)
def test_summary_says_what_is_known(figures, line):
    assert figures.summary() == line


@pytest.mark.parametrize(
    "ending, words",
    [
        ("stop", "finished"),
        ("length", "hit max new tokens"),
        ("stopped", "stopped"),
        ("failed", "ended by an error"),
    ],
)
def test_a_finished_note_names_why_the_reply_ended(ending, words):
    note = stats_note(ReplyFigures(tokens=3, ending=ending))
    assert note["metadata"]["title"] == f"3 tokens · {words}" and note["metadata"]["status"] == "done"
    assert note["content"] == "" and note["role"] == "assistant"
    assert read_figures(note) == ReplyFigures(tokens=3, ending=ending), "the figures ride along, readable"


def test_a_streaming_note_spins_and_names_no_ending():
    note = stats_note(ReplyFigures(tokens=3))
    assert note["metadata"]["status"] == "pending" and note["metadata"]["title"] == "3 tokens"


def test_only_cut_replies_can_be_continued():
    assert ReplyFigures(ending="length").can_continue and ReplyFigures(ending="stopped").can_continue
    assert not ReplyFigures(ending="stop").can_continue and not ReplyFigures().can_continue


def test_a_continuation_adds_its_tokens_to_the_reply():
    first = ReplyFigures(tokens=100, first_token_s=0.2, tokens_per_s=30.0, ending="length")
    later = ReplyFigures(tokens=40, first_token_s=0.3, tokens_per_s=28.0, ending="stop")
    merged = first.followed_by(later)
    assert merged == ReplyFigures(tokens=140, first_token_s=0.3, tokens_per_s=28.0, ending="stop", parts=2)
    assert merged.followed_by(later).parts == 3


GRADIO_HISTORY = [
    {"role": "user", "metadata": None, "content": [{"text": "hi", "type": "text"}], "options": None},
    {"role": "assistant", "metadata": {}, "content": [{"text": "hello", "type": "text"}], "options": []},
    {**stats_note(ReplyFigures(tokens=1, ending="length")), "content": [{"text": "", "type": "text"}]},
]


def test_notes_never_reach_the_model():
    assert without_notes(GRADIO_HISTORY) == GRADIO_HISTORY[:2]
    assert without_notes([waiting_note("Loading…"), reply_message("x")]) == [reply_message("x")]
    assert without_notes("not a list") == "not a list", "the chat service names that problem"
    thought = {"role": "assistant", "content": "x", "metadata": {"title": "a thought", "id": "mine"}}
    assert not is_note(thought), "only the page's own notes are taken out"


def test_last_reply_figures_read_the_note_that_ends_the_history():
    assert last_reply_figures(GRADIO_HISTORY) == ReplyFigures(tokens=1, ending="length")
    assert last_reply_figures(GRADIO_HISTORY[:2]) is None and last_reply_figures([]) is None


@pytest.mark.parametrize(
    "forged_id",
    [
        "reply-stats:not json",
        'reply-stats:{"tokens": -1}',
        'reply-stats:{"tokens": "many"}',
        'reply-stats:{"ending": "exploded"}',
        'reply-stats:{"evil": 1}',
        "reply-stats:[1, 2]",
    ],
)
def test_a_malformed_note_reads_as_no_figures(forged_id):
    note = {"role": "assistant", "content": "", "metadata": {"title": "x", "id": forged_id}}
    assert read_figures(note) is None
    assert is_note(note), "it is still the page's note, kept from the model"


def test_settle_ends_what_still_spins():
    streaming = [reply_message("part"), stats_note(ReplyFigures(tokens=7, tokens_per_s=3.0))]
    settled = settle(streaming)
    assert settled[0] == streaming[0]
    assert read_figures(settled[1]) == ReplyFigures(tokens=7, tokens_per_s=3.0, ending="stopped")
    assert settled[1]["metadata"]["status"] == "done"
    assert read_figures(settle(streaming, "failed")[1]).ending == "failed"
    finished = [reply_message("x"), stats_note(ReplyFigures(tokens=1, ending="stop"))]
    assert settle(finished) == finished, "a finished reply is left as it is"
    waited = settle([waiting_note("Downloading… 40%")])[0]
    assert waited["metadata"]["title"] == STOPPED_WAITING and waited["metadata"]["status"] == "done"


def test_the_api_gets_the_reply_text_only():
    assert reply_text([reply_message("hello"), stats_note(ReplyFigures(tokens=1))]) == "hello"
    assert reply_text([waiting_note("Loading…")]) is None, "nothing to say while waiting"
    assert reply_text("plain") == "plain"
