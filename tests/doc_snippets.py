"""The code examples and links of the project's Markdown pages, read for tests/test_docs.py.

Every fenced block in Python or shell is an example that must run against the app (on the tiny
checkpoint, in CI), unless the line just above its fence marks it as one that can only run
elsewhere, with the reason, which the test shows when it skips it:

    <!-- example: elsewhere (needs a CUDA GPU and the 14.5 GB weights) -->

Blocks in other languages (JSON, nginx, plain text) are shown, not run. Links are checked
without a network: a relative link must name a file or folder of the repository, and an anchor
a heading of the page it points into.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RUNNABLE = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
MARK = re.compile(r"<!--\s*example:\s*elsewhere\s*\((?P<reason>[^)]+)\)\s*-->")
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE = re.compile(r"!\[[^\]]*\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$")


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int  # of the opening fence, 1-based
    kind: str  # "python" or "shell"
    code: str
    elsewhere: str | None  # why it cannot run here, when its mark says so

    @property
    def name(self) -> str:
        first = next((line.strip() for line in self.code.splitlines() if line.strip()), "")
        return f"{self.page.name}:{self.line} {first[:50]}"


def markdown_pages(root: Path) -> list[Path]:
    """The README and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def snippets(page: Path) -> list[Snippet]:
    """The Python and shell blocks of `page`, each with its mark."""
    found: list[Snippet] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        close = re.compile(rf"^ {{0,3}}{re.escape(opening['fence'][0])}{{{len(opening['fence'])},}}\s*$")
        end = next((i for i in range(index + 1, len(lines)) if close.match(lines[i])), len(lines))
        kind = RUNNABLE.get(opening["lang"].lower())
        if kind is not None:
            mark = MARK.search(lines[index - 1]) if index > 0 else None
            code = "\n".join(lines[index + 1 : end]) + "\n"
            found.append(Snippet(page, index + 1, kind, code, mark["reason"] if mark else None))
        index = end + 1
    return found


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`|\*\*|__", "", title.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on `page` (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    result = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        if in_code or not (heading := HEADING.match(line)):
            continue
        base = slug(heading["title"])
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(page: Path, root: Path) -> list[str]:
    """Relative links and images of `page` that name no file of the repository, or no heading."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    problems = []
    targets = [m["target"] for m in LINK.finditer(text)] + [m["target"] for m in IMAGE.finditer(text)]
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... (no network here)
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            problems.append(f"{page.relative_to(root)}: {target} names no file")
        elif root.resolve() not in linked.resolve().parents and linked.resolve() != root.resolve():
            problems.append(f"{page.relative_to(root)}: {target} points outside the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{page.relative_to(root)}: {target} names no heading of {linked.name}")
    return problems
