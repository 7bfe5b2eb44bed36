"""A reply as the chat shows it: its Markdown, code and LaTeX rendered, its raw HTML as text. Pure.

gradio's chatbot renders a message's Markdown with `marked`, which passes raw HTML through (its
sanitizer then drops scripts and event handlers, but keeps `<b>`, `<img>`, `<a>`...), and it has no
setting that shows raw HTML as text while rendering Markdown. So each reply is sent to the browser
with a backslash before every `<` that would open an HTML tag, comment or declaration outside
code and math: `\\<` is Markdown's own way of writing a literal `<`. Code (fenced blocks and
spans) and LaTeX are left as they are: the browser shows code verbatim and math through KaTeX.

The browser sends the chat back as the history of the next turn, so `written_reply` undoes
`shown_reply` exactly (`written_reply(shown_reply(t)) == t` for every text, a tested property):
the model always gets what it wrote. Backslashes already before such a `<` are doubled, so that
the text shows as written and the step back knows which backslashes it added.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

# The delimiters the chat renders as LaTeX, in the order gradio's front end takes them out of a
# message (each span becomes a placeholder) before the rest goes through Markdown.
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]
MATH = [re.compile(f"{re.escape(d['left'])}[\\s\\S]+?{re.escape(d['right'])}") for d in LATEX_DELIMITERS]
# `<` then a letter, `/`, `!` or `?`: the start of an HTML tag, end tag, comment, declaration or
# processing instruction, the only ways Markdown lets raw HTML in.
HTML_START = re.compile(r"<(?=[A-Za-z/!?])")
# A code fence line, also indented or in a blockquote, and what follows the fence on it.
FENCE = re.compile(r"^[ \t>]*(`{3,}|~{3,})(.*)$", re.MULTILINE)
BLANK = re.compile(r"\n[ \t]*\n")
BACKTICKS = re.compile(r"`+")
# Replies with markup, rewritten once each: every update of a streaming reply re-sends the whole
# conversation, whose earlier replies have not changed.
CACHED = 256


def shown_reply(text: str) -> str:
    """`text` with its raw HTML made literal for the chat's Markdown (see the module docstring)."""
    return _rewritten(text, shown=True) if HTML_START.search(text) else text


def written_reply(shown: str) -> str:
    """The text `shown_reply` was given, from what it returned."""
    return _rewritten(shown, shown=False) if HTML_START.search(shown) else shown


@lru_cache(maxsize=CACHED)
def _rewritten(text: str, shown: bool) -> str:
    if shown:  # k backslashes before the `<` become 2k + 1: k shown, and one to make it text
        return _rewrite(text, lambda run: 2 * run + 1)
    return _rewrite(text, lambda run: (run - 1) // 2 if run % 2 else run)


def _rewrite(text: str, backslashes) -> str:
    """`text` with the run of backslashes before each HTML-starting `<` outside code and math
    replaced by `backslashes(length of the run)` backslashes."""
    pieces, done = [], 0
    for at in html_starts(text):
        run = backslashes_before(text, at)
        pieces += [text[done : at - run], "\\" * backslashes(run)]
        done = at
    return "".join([*pieces, text[done:]])


def backslashes_before(text: str, at: int) -> int:
    start = at
    while start > 0 and text[start - 1] == "\\":
        start -= 1
    return at - start


def html_starts(text: str) -> Iterator[int]:
    """Where a `<` outside code and math would start raw HTML in the chat's Markdown.

    The same text structure is found in a reply and in its shown form (backslashes are added
    only before such a `<`, which changes no fence, code span, blank line or math delimiter),
    which is what makes `written_reply` exact."""
    masked = without_math(text)
    spans = iter(code_spans(masked))  # in order, none overlapping
    span = next(spans, None)
    for match in HTML_START.finditer(masked):
        while span is not None and span[1] <= match.start():
            span = next(spans, None)
        if span is None or match.start() < span[0]:
            yield match.start()


def without_math(text: str) -> str:
    """`text` with each LaTeX span, found as the browser finds them, blanked to the same length
    (newlines kept), so that nothing in math counts as code or HTML."""
    for pattern in MATH:
        text = pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)
    return text


def code_spans(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each fenced code block and each code span."""
    prose_start = 0
    for start, end in fenced_blocks(text):
        yield from inline_code(text, prose_start, start)
        yield start, end
        prose_start = end
    yield from inline_code(text, prose_start, len(text))


def fenced_blocks(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each fenced block, its fence lines included; an unclosed fence runs to
    the end, as in Markdown (and as a reply still streaming often has)."""
    opened = None
    for fence in FENCE.finditer(text):
        if opened is None:
            opened = (fence.start(), fence.group(1))
        elif closes(fence.group(1), opened[1], fence.group(2)):
            yield opened[0], fence.end()
            opened = None
    if opened is not None:
        yield opened[0], len(text)


def closes(fence: str, opening: str, rest: str) -> bool:
    """A closing fence: the opening's character, at least as long, and nothing after it."""
    return fence[0] == opening[0] and len(fence) >= len(opening) and not rest.strip()


def inline_code(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Code spans in text[start:end]: a run of backticks to the next run of the same length in
    the same paragraph. A run after a backslash, or without a closing run, is plain text."""
    for paragraph_start, paragraph_end in paragraphs(text, start, end):
        at = paragraph_start
        while (opening := BACKTICKS.search(text, at, paragraph_end)) is not None:
            at = opening.end()
            if backslashes_before(text, opening.start()) % 2:  # an escaped backtick
                continue
            closing = BACKTICKS.search(text, at, paragraph_end)
            while closing is not None and len(closing.group()) != len(opening.group()):
                closing = BACKTICKS.search(text, closing.end(), paragraph_end)
            if closing is not None:
                yield opening.start(), closing.end()
                at = closing.end()


def paragraphs(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """text[start:end] cut at blank lines, which no code span crosses."""
    for blank in BLANK.finditer(text, start, end):
        yield start, blank.start()
        start = blank.end()
    yield start, end
