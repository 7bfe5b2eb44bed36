"""A reply's raw HTML shown as text, its Markdown, code and math untouched, and the exact way back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from orca_space.web.page.reply_markdown import shown_reply, without_math, written_reply

# Replies as a model writes them, each with raw HTML somewhere Markdown would render it.
REPLIES = [
    "hi</s><s> and <b>bold?</b>",
    "Use <br> for a line break, and <!-- a comment --> for notes.",
    '<div class="card">\n  <p>A block of HTML</p>\n</div>\n\nThen **Markdown**.',
    "<img src=x onerror=\"alert(1)\"> and <script>alert(2)</script> and <a href='javascript:x'>y</a>",
    "1. First <em>item</em>\n2. Second:\n   ```html\n   <p>in code</p>\n   ```\n3. Third <u>one</u>",
    "> Quoted <i>text</i>\n> ```\n> <b>quoted code</b>\n> ```",
    "A <thinking>custom tag</thinking> and <?xml version='1.0'?> and <![CDATA[x]]>",
    "Escaped already: \\<b> stays text; \\\\<i> was a backslash and a tag.",
]


def html_tokens(markdown: str) -> list[str]:
    """Raw HTML that CommonMark (markdown-it) finds, with the LaTeX spans the chat takes out of a
    message first left out, as the browser leaves them out."""
    found = []
    for token in MarkdownIt("commonmark").parse(without_math(markdown)):
        found += [token.content] if token.type == "html_block" else []
        found += [child.content for child in token.children or [] if child.type == "html_inline"]
    return found


@pytest.mark.parametrize("reply", REPLIES)
def test_raw_html_in_a_reply_is_shown_as_text(reply):
    assert html_tokens(reply), "the example must hold raw HTML that Markdown renders"
    shown = shown_reply(reply)
    assert html_tokens(shown) == [], f"raw HTML still rendered in {shown!r}"
    assert written_reply(shown) == reply


def test_markdown_code_and_math_are_left_as_written():
    reply = (
        "# Title\n\n**bold**, *it*, [link](https://example.com), <https://example.com>? x < y, 3<4.\n\n"
        "```python\nif a<b and c>d:\n    print('<b>')\n```\n\n"
        "Inline `<div>` and ``a `<b>` b``.\n\n$$\\frac{a<b}{c}$$ and $x<y$ and \\(a<b\\)"
    )
    shown = shown_reply(reply)
    assert shown == reply.replace("<https://", "\\<https://"), (
        "only a `<` that could open a tag gains a backslash (an autolink's too: its URL is still linked)"
    )


def test_backslashes_before_a_tag_are_kept_visible():
    """`\\<b>` shows as `\\<b>` (what the model wrote), not as `<b>`: its backslash is doubled."""
    assert shown_reply("\\<b>") == "\\\\\\<b>"
    assert written_reply("\\\\\\<b>") == "\\<b>"


def test_an_unclosed_fence_is_code_to_the_end_as_while_a_reply_streams():
    assert shown_reply("Here:\n```html\n<div>") == "Here:\n```html\n<div>"
    assert shown_reply("```\n<a>\n```\n<b>") == "```\n<a>\n```\n\\<b>", "after the fence, prose again"


def test_a_backtick_without_its_pair_is_plain_text():
    assert shown_reply("it`s <b>") == "it`s \\<b>"
    assert shown_reply("`a\n\n<b>`") == "`a\n\n\\<b>`", "no code span crosses a blank line"
    assert shown_reply("\\`<b>`") == "\\`\\<b>`", "an escaped backtick opens nothing"


# Text made of what the rewriting looks at: backslashes, `<`, backticks, fences, math, newlines.
MARKUP = st.text(alphabet=st.sampled_from(list("<>\\`~$()[]/!?ab \n")), max_size=60)


@settings(max_examples=400, deadline=None)
@given(MARKUP)
def test_the_way_back_is_exact(text):
    """The browser sends the chat back as the next turn's history: the model must get what it wrote."""
    assert written_reply(shown_reply(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_the_way_back_is_exact_for_any_text(text):
    assert written_reply(shown_reply(text)) == text
