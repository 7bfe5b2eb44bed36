"""A user's message as a verbatim block for the chat's Markdown, and the exact way back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from orca_space.web.page.typed_message import shown_message, written_message

TYPED = st.lists(
    st.sampled_from([*"`~<>!$\\ \n\tab*_[]()", "```", "as-typed", "````as-typed\n"]), max_size=30
).map("".join)


@settings(max_examples=300, deadline=None)
@given(TYPED)
def test_a_message_is_one_code_block_of_exactly_its_text(typed):
    """CommonMark reads the shown form as one fenced block holding the typed text, whatever it holds."""
    tokens = MarkdownIt("commonmark").parse(shown_message(typed))
    assert [t.type for t in tokens] == ["fence"], f"not one block: {[t.type for t in tokens]}"
    assert tokens[0].info == "as-typed" and tokens[0].content == typed + "\n"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | TYPED)
def test_the_way_back_is_exact(typed):
    assert written_message(shown_message(typed)) == typed


def test_an_edited_message_comes_back_as_it_is():
    """The edit box holds the typed text (the page's script puts it there): taken as written."""
    assert written_message("just text") == "just text"
    assert written_message("```as-typed\nx ``` y\n```") == "```as-typed\nx ``` y\n```", (
        "a fence the text itself holds is not ours: ours is longer than any run inside"
    )
