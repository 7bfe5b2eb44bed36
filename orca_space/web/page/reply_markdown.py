"""A reply as the chat shows it: its Markdown, code and LaTeX rendered, its raw HTML as text. Pure.

gradio's chatbot renders a message in the browser: LaTeX spans are taken out first (each becomes
a placeholder), the rest goes through `marked` (GFM), whose output keeps raw HTML (gradio's
sanitizer drops scripts and event handlers but keeps `<form>`, `style`, `<img>`...). There is no
setting that shows raw HTML as text while rendering Markdown, so each reply is sent with every
`<` that could open a tag written as the entity `&lt;`, and every `!` that would open a picture
(`![alt](address)`, which the browser would fetch) as `&#33;`, wherever they are prose. An entity
is text to Markdown and to the browser, in every shape: even right after a bare URL, where
marked's GFM autolink swallows a backslash escape and then draws the tag.

What is prose and what is code is decided the way a CommonMark + GFM parser decides it:
markdown-it-py parses the reply, as the browser would see it (LaTeX spans replaced by gradio's
placeholders), with each such character replaced by a private-use sentinel, and whichever
sentinels come back inside a code block, fence or code span stay as written (the browser shows
code verbatim). Anything not positively code is escaped: a misjudged code span costs an `&lt;`
shown in code, never a tag drawn. Inline code in a paragraph that holds a bare URL is escaped too
(marked's autolink runs up to the next space, backticks included, so there it is no code span).
tests/test_browser_markdown.py checks in Chromium, against the page's own renderer, that no
element from a reply is drawn.

The browser sends the chat back as the history of the next turn, so `written_reply` undoes
`shown_reply` exactly (`written_reply(shown_reply(t)) == t` for every text, a tested property):
the model always gets what it wrote. The reply's own `&lt;` and `&#33;` in prose gain an `amp;`
(`&amp;lt;`), so that the way back knows which entities it added; the way back finds prose in the
shown text as the way out found it in the reply, and `shown_reply` checks that it does. Where it
would not (a shape where escaping changes what is code), the reply is shown with every such
character escaped, code included, and a word joiner (U+2060) at its end says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from markdown_it import MarkdownIt

# The delimiters the chat renders as LaTeX, in the order gradio's front end takes them out of a
# message (each span becomes a placeholder) before the rest goes through Markdown.
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "$", "right": "$", "display": False},
]
MATH = [re.compile(f"{re.escape(d['left'])}[\\s\\S]+?{re.escape(d['right'])}") for d in LATEX_DELIMITERS]
# What the browser's Markdown could make an element of, or what an escape of ours looks like:
# `<` then a letter, `/`, `!` or `?` (a tag, end tag, comment, declaration or processing
# instruction: the only ways raw HTML gets in), `![` (a picture), the `m` of "```mermaid" (gradio
# puts a mermaid block's text into the page as HTML, and mermaid draws HTML in its labels), and
# the entities we write.
SPECIAL = re.compile(r"<(?=[A-Za-z/!?])|!(?=\[)|(?<=```)m(?=ermaid)|&(?:amp;)*(?:lt;|#33;|#109;(?=ermaid))")
ESCAPED = {"<": "&lt;", "!": "&#33;", "m": "&#109;"}
UNESCAPED = {entity: character for character, entity in ESCAPED.items()}
# In shown text: an entity of ours (no `amp;`) or the reply's own (one `amp;` more than written).
SHOWN_ENTITY = re.compile(r"&(?:amp;)*(?:lt;|#33;|#109;(?=ermaid))")
# Kept as written only in a code block's text, not in a code span: gradio's mermaid extension
# to marked also starts a block where CommonMark sees a code span ("x```mermaid ...```").
BLOCK_ONLY = re.compile(r"m|&(?:amp;)*#109;")
# Where marked may take a code span's backticks into something else: its GFM autolink starts at
# these anywhere in a word and runs to the next space or `<`, and its strikethrough (one tilde is
# enough) runs over a backtick (`~a `~ <b>`` is struck text, then a tag).
UNSURE_SPANS = re.compile(r"(?:ftp|https?)://|www\.|~")
BLANK_LINE = re.compile(r"\n[ \t]*\n")
LINE_PREFIX = re.compile(r"[ \t>]*")
ALL_ESCAPED = "\u2060"  # ends a reply shown with every special character escaped, code included
# Private-use characters stand for the special characters while markdown-it parses.
SENTINELS = [chr(c) for c in range(0xE000, 0xF900)]
# markdown-it as close to marked's GFM as matters for what is code: CommonMark and tables. What
# cannot change where code is, given that no `<` that starts a tag and no `![` is left (they are
# sentinels), is left out, which halves the time a parse takes: emphasis, strikethrough, entities,
# raw HTML, autolinks and pictures.
PARSER = (
    MarkdownIt("commonmark")
    .enable(["table"])
    .disable(["emphasis", "entity", "html_inline", "html_block", "autolink", "image"])
)
SENTINEL_SET = frozenset(SENTINELS)
CACHED = 256  # a streaming reply re-sends the whole chat, whose earlier replies have not changed


def shown_reply(text: str) -> str:
    """`text` with its raw HTML and pictures made literal for the chat's Markdown."""
    return _shown(text) if _needs_rewriting(text) else text


def written_reply(shown: str) -> str:
    """The text `shown_reply` was given, from what it returned."""
    return _written(shown) if _needs_rewriting(shown) else shown


def _needs_rewriting(text: str) -> bool:
    return SPECIAL.search(text) is not None or text.endswith(ALL_ESCAPED)


@lru_cache(maxsize=CACHED)
def _shown(text: str) -> str:
    if not text.endswith(ALL_ESCAPED):
        shown = rewrite(text, SPECIAL, escape)
        if shown is not None and not shown.endswith(ALL_ESCAPED) and _written(shown) == text:
            return shown
    return all_escaped(text) + ALL_ESCAPED


@lru_cache(maxsize=CACHED)
def _written(shown: str) -> str:
    if shown.endswith(ALL_ESCAPED):
        return outside_math(
            shown[: -len(ALL_ESCAPED)], lambda part: replace_all(part, SHOWN_ENTITY, unescape)
        )
    written = rewrite(shown, SHOWN_ENTITY, unescape)
    return shown if written is None else written


def escape(text: str, match: re.Match) -> tuple[int, str]:
    """`<` and `!` as entities, the backslashes just before them doubled (so that they show as
    written, as text before a `<` that is text); an entity as written gains an `amp;`."""
    found = match.group()
    if found in ESCAPED:
        run = backslashes_before(text, match.start())
        return match.start() - run, "\\" * (2 * run) + ESCAPED[found]
    return match.start(), "&amp;" + found[1:]


def unescape(text: str, match: re.Match) -> tuple[int, str]:
    found = match.group()
    if found.startswith("&amp;"):
        return match.start(), "&" + found[len("&amp;") :]
    run = backslashes_before(text, match.start())
    return match.start() - run, "\\" * (run // 2) + UNESCAPED[found]


def backslashes_before(text: str, at: int) -> int:
    start = at
    while start > 0 and text[start - 1] == "\\":
        start -= 1
    return at - start


def all_escaped(text: str) -> str:
    """Every special character escaped, in code too (outside LaTeX, which the browser takes
    out first): for the shapes where escaping prose alone could not be undone exactly."""
    return outside_math(text, lambda part: replace_all(part, SPECIAL, escape))


def outside_math(text: str, change: Callable[[str], str]) -> str:
    """`text` with `change` applied to what lies between the browser's LaTeX spans."""
    pieces, done = [], 0
    for start, end in math_spans(text):
        pieces += [change(text[done:start]), text[start:end]]
        done = end
    return "".join([*pieces, change(text[done:])])


Change = Callable[[str, re.Match], tuple[int, str]]  # (where the replacement starts, what it is)


def rewrite(text: str, pattern: re.Pattern, change: Change) -> str | None:
    """`text` with each match of `pattern` in prose replaced by `change`; matches in code or
    LaTeX stay as they are. None if there are more matches than sentinels, or the text holds
    a private-use character of their range (then the caller escapes everything)."""
    matches = list(pattern.finditer(text))
    if len(matches) > len(SENTINELS) or not SENTINEL_SET.isdisjoint(text):
        return None
    in_blocks, in_spans = code_sentinels(with_sentinels(text, matches))
    kept = [
        SENTINELS[index] in in_blocks
        or (
            SENTINELS[index] in in_spans
            and not BLOCK_ONLY.fullmatch(match.group())
            and not starts_a_line(text, match)
        )
        for index, match in enumerate(matches)
    ]
    return replace(text, [match for match, keep in zip(matches, kept) if not keep], change)


def starts_a_line(text: str, match: re.Match) -> bool:
    """Whether only spaces and quote marks come before `match` on its line. A `<` there, kept
    in a code span that goes on from the line above, would start an HTML block in the browser's
    Markdown and cut the span short (the parse above saw no tag: the `<` was a sentinel)."""
    line_start = text.rfind("\n", 0, match.start()) + 1
    return LINE_PREFIX.fullmatch(text, line_start, match.start()) is not None


def replace_all(text: str, pattern: re.Pattern, change: Change) -> str:
    return replace(text, list(pattern.finditer(text)), change)


def replace(text: str, matches: list[re.Match], change: Change) -> str:
    pieces, done = [], 0
    for match in matches:
        start, replacement = change(text, match)
        pieces += [text[done:start], replacement]
        done = match.end()
    return "".join([*pieces, text[done:]])


def with_sentinels(text: str, matches: list[re.Match]) -> str:
    pieces, done = [], 0
    for index, match in enumerate(matches):
        pieces += [text[done : match.start()], SENTINELS[index]]
        done = match.end()
    return "".join([*pieces, text[done:]])


def code_sentinels(text: str) -> tuple[set[str], set[str]]:
    """The sentinels in code blocks and in code spans (or LaTeX), as markdown-it finds them in
    `text` as the browser's Markdown gets it (its LaTeX spans replaced by gradio's placeholders).
    Those in LaTeX spans count as code: the browser renders them with KaTeX, never as HTML. A
    fence's info string is not code: marked makes it a class name, and nothing in it is kept."""
    markdown = as_marked_gets_it(text)
    sentinels = SENTINEL_SET
    in_blocks: set[str] = set()
    in_spans = set(text) - set(markdown)  # in LaTeX
    for token in PARSER.parse(markdown):
        if token.type in ("fence", "code_block"):
            in_blocks.update(token.content)
        for child in token.children or []:
            if child.type == "code_inline":
                in_spans.update(child.content)
    unsure = unsure_paragraphs(markdown)
    return in_blocks & sentinels, (in_spans & sentinels) - (unsure - (set(text) - set(markdown)))


def unsure_paragraphs(markdown: str) -> set[str]:
    """Sentinels in paragraphs where marked may not see a code span where CommonMark does (a
    bare URL, a tilde): what is in their code spans is not surely code. (Blocks are found first.)"""
    found: set[str] = set()
    for paragraph in BLANK_LINE.split(markdown):
        if UNSURE_SPANS.search(paragraph):
            found.update(paragraph)
    return found


def as_marked_gets_it(text: str) -> str:
    """`text` with its LaTeX spans replaced as gradio's front end replaces them, one delimiter
    after another, before Markdown sees it."""
    count = 0

    def placeholder(_match: re.Match) -> str:
        nonlocal count
        count += 1
        return f"%%%LATEX_BLOCK_{count - 1}%%%"

    for pattern in MATH:
        text = pattern.sub(placeholder, text)
    return text


def math_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each LaTeX span the browser takes out, in order."""
    spans: list[tuple[int, int]] = []
    masked = text
    for pattern in MATH:
        for match in pattern.finditer(masked):
            spans.append(match.span())
        masked = pattern.sub(lambda m: "\0" * len(m.group()), masked)
    # A later delimiter's span may hold an earlier one's (`$ a $$b$$ c $`): keep the outer.
    outer: list[tuple[int, int]] = []
    for start, end in sorted(spans, key=lambda span: (span[0], -span[1])):
        if not outer or start >= outer[-1][1]:
            outer.append((start, end))
    return outer


def without_math(text: str) -> str:
    """`text` with each LaTeX span blanked to the same length (newlines kept)."""
    for start, end in math_spans(text):
        text = text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]
    return text
