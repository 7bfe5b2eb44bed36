"""A user's message as the chat shows it: exactly as typed, nothing in it drawn as Markdown. Pure.

gradio's chatbot renders every message as Markdown with raw HTML (`marked`, then a sanitizer
that keeps `<img>`, `<form>`, `style`...), a user's too, and offers no setting for one role.
Fixing the drawn message up afterwards is too late: the browser fetches a picture as soon as its
element is made, before any script sees it. So a user's message goes to the browser as a fenced
code block whose fence is longer than any run of backticks in it, marked `as-typed`: marked
draws its text as text, character for character, and makes no element of anything in it (no
picture, link, tag or LaTeX; KaTeX leaves code alone). The page's CSS draws that block as the
message's plain text (`assets.CSS`), and its script gives the message's accessible name, its edit
box and what its copy buttons copy the typed text (`assets.LIVE_PAGE_HEAD`).

`written_message` undoes `shown_message` exactly: the browser sends the chat back as the next
turn's history.
"""

from __future__ import annotations

import re

INFO = "as-typed"  # the fence's info string: marked gives the code `class="language-as-typed"`
BACKTICKS = re.compile(r"`+")
SHOWN = re.compile(rf"(`{{3,}}){INFO}\n(.*)\n\1", re.DOTALL)


def shown_message(text: str) -> str:
    """`text` as a code block that Markdown shows verbatim."""
    fence = "`" * max(3, 1 + max((len(run) for run in BACKTICKS.findall(text)), default=0))
    return f"{fence}{INFO}\n{text}\n{fence}"


def written_message(shown: str) -> str:
    """The text `shown_message` was given; any other text (an edited message) as it is."""
    match = SHOWN.fullmatch(shown)
    if match is None or match.group(1) in match.group(2):
        return shown
    return match.group(2)
