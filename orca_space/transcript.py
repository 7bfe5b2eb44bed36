"""A conversation as a file: JSON to save and load back, Markdown to read. Pure: no gradio.

The JSON holds the messages (each reply with its figures), the system message, the generation
settings and the model's name. Loading one back is strict, because the file comes from
anywhere: a size limit before parsing, then every field checked, and a `TranscriptError`
naming the first problem. A system turn in the messages, a wrong type or an unknown field is
refused; nothing is half-loaded.

What is checked is the file's structure, not its words: imported text is text, exactly as typed
text is. `<|im_start|>` in a message (a chat about ChatML, say) stays plain text for the model,
because `chatml` never turns text into control tokens; the system turn comes only from the
system-message field, and every message's role is one of two.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .chat import MAX_HISTORY_MESSAGE_CHARS, MAX_HISTORY_MESSAGES, MAX_SYSTEM_CHARS, message_text
from .params import LIMITS, PARAMETER_ORDER, check_value
from .reply_stats import ReplyFigures, is_note, read_figures, reply_message, stats_note

FORMAT = "orca-space/conversation"
VERSION = 1
# Below the 4 MB request-body cap with room for JSON escaping on the way in, and as much as the
# page can send back each turn anyway (it sends the whole conversation).
MAX_TRANSCRIPT_BYTES = 1 << 20
TOP_LEVEL_FIELDS = {"format", "version", "model", "exported_at", "system_message", "settings", "messages"}
MESSAGE_FIELDS = {"role", "content", "stats"}


class TranscriptError(ValueError):
    """The file is not a conversation this page can load; the message says why."""


@dataclass(frozen=True)
class Transcript:
    messages: list[dict[str, Any]]  # the chat as the page shows it: replies followed by their notes
    system_message: str
    settings: dict[str, float]  # sampling parameters by name, checked; only those in the file
    model: str = ""


def conversation_json(
    history: Sequence[Mapping[str, Any]],
    system_message: str,
    settings: Mapping[str, float],
    model: str,
    now: datetime | None = None,
) -> str:
    """The JSON file for the chat as the page shows it (history with its notes)."""
    document = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "exported_at": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "system_message": system_message,
        "settings": {name: settings[name] for name in PARAMETER_ORDER if name in settings},
        "messages": exported_messages(history),
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def exported_messages(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """User and assistant messages as text, each reply with the figures of the note under it."""
    messages: list[dict[str, Any]] = []
    for message in history:
        figures = read_figures(message)
        if figures is not None and messages and messages[-1]["role"] == "assistant":
            messages[-1]["stats"] = figures.to_dict()
        elif not is_note(message) and message.get("role") in ("user", "assistant"):
            text = message_text(message.get("content", ""), "a message")
            messages.append({"role": message["role"], "content": text})
    return messages


def conversation_markdown(
    history: Sequence[Mapping[str, Any]],
    system_message: str,
    settings: Mapping[str, float],
    model: str,
    now: datetime | None = None,
) -> str:
    """The chat to read: a heading per message, each reply's figures in italics under it."""
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    shown = settings_sentence(settings)
    lines = [f"# Conversation with {model}", "", f"Exported {when}. Settings: {shown or 'defaults'}.", ""]
    if system_message.strip():
        lines += ["## System", "", system_message, ""]
    for message in exported_messages(history):
        lines += [f"## {message['role'].capitalize()}", "", under_the_heading(message["content"]), ""]
        if "stats" in message:
            lines += [f"*{ReplyFigures.from_dict(message['stats']).line()}*", ""]
    return "\n".join(lines)


def under_the_heading(text: str, level: int = 3) -> str:
    """`text` with its own headings made `level` or deeper, so that a message's `# Heading` sits
    under the message's `## User` in a reader's outline, not above it. Headings are found as
    CommonMark finds them (markdown-it), so a `# comment` in a code block stays as written."""
    from markdown_it import MarkdownIt

    lines: list[str | None] = list(text.split("\n"))
    for token in MarkdownIt("commonmark").parse(text):
        # Top-level headings only: one inside a quote or a list item keeps its markers as typed.
        if token.type != "heading_open" or token.map is None or token.level != 0:
            continue
        first, end = token.map
        depth = min(6, max(level, int(token.tag[1]) + level - 1))
        if token.markup.startswith("#"):  # ATX: "# Title"
            lines[first] = "#" * depth + " " + lines[first].lstrip()[len(token.markup) :].lstrip()
        else:  # setext: "Title" over "===" or "---", as one ATX line (its last line is the rule)
            title = " ".join(line.strip() for line in lines[first : end - 1])
            lines[first:end] = ["#" * depth + " " + title] + [None] * (end - first - 1)
    return "\n".join(line for line in lines if line is not None)


def setting_name(name: str) -> str:
    """The slider's label, short, for a sentence: "Top-k (0 = off)" -> "top-k"."""
    return short_label(name).lower()


def short_label(name: str) -> str:
    """The slider's label without its note: "Top-k (0 = off)" -> "Top-k"."""
    return LIMITS[name].label.split(" (")[0]


def settings_sentence(settings: Mapping[str, float]) -> str:
    """ "max new tokens 500, temperature 0.7", in the sliders' order; "" for none."""
    return ", ".join(
        f"{setting_name(name)} {settings[name]:g}" for name in PARAMETER_ORDER if name in settings
    )


def parse_transcript(text: object, size: object = None) -> Transcript:
    """Check a file's text (and the size the browser reported) and read the conversation;
    raises TranscriptError naming the first problem."""
    if isinstance(size, (int, float)) and not isinstance(size, bool) and size > MAX_TRANSCRIPT_BYTES:
        raise TranscriptError(too_large(size))
    if not isinstance(text, str) or not text.strip():
        raise TranscriptError("the file is empty (or no file was chosen)")
    if (length := len(text.encode("utf-8", "surrogatepass"))) > MAX_TRANSCRIPT_BYTES:
        raise TranscriptError(too_large(length))
    try:
        document = json.loads(text, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise TranscriptError(f"the file is not valid JSON ({str(exc)[:120]})") from None
    return read_document(document)


def too_large(size: float) -> str:
    return f"the file is {size / (1 << 20):.1f} MB; the limit is {MAX_TRANSCRIPT_BYTES >> 20} MB"


def refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def read_document(document: object) -> Transcript:
    if not isinstance(document, dict):
        raise TranscriptError("the file must hold a JSON object")
    if document.get("format") != FORMAT:
        raise TranscriptError(f'this is not an orca-space conversation (its "format" must be "{FORMAT}")')
    if document.get("version") != VERSION:
        version = document.get("version")
        raise TranscriptError(f"the file is version {version!r}; this page reads version {VERSION}")
    if unknown := set(document) - TOP_LEVEL_FIELDS:
        raise TranscriptError(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    model = document.get("model", "")
    if not isinstance(model, str) or len(model) > 200:
        raise TranscriptError("model must be a name (text)")
    return Transcript(
        messages=read_messages(document.get("messages")),
        system_message=checked_text("system_message", document.get("system_message", ""), MAX_SYSTEM_CHARS),
        settings=read_settings(document.get("settings", {})),
        model=model,
    )


def read_messages(messages: object) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise TranscriptError("messages must be a list")
    if len(messages) > MAX_HISTORY_MESSAGES:
        raise TranscriptError(
            f"the file has {len(messages):,} messages; the limit is {MAX_HISTORY_MESSAGES:,}"
        )
    shown: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise TranscriptError(f"{where} must be an object with a role and a content")
        if unknown := set(message) - MESSAGE_FIELDS:
            raise TranscriptError(f"{where} has unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        role = message.get("role")
        if role not in ("user", "assistant"):
            # The system turn comes only from the system-message box, never from history.
            raise TranscriptError(f"{where} has role {role!r}; only 'user' and 'assistant' are allowed")
        content = checked_text(f"{where}.content", message.get("content"), MAX_HISTORY_MESSAGE_CHARS)
        shown.append({"role": role, "content": content} if role == "user" else reply_message(content))
        if "stats" in message:
            if role != "assistant":
                raise TranscriptError(f"{where} has stats, but only a reply has figures")
            try:
                shown.append(stats_note(ReplyFigures.from_dict(message["stats"])))
            except (TypeError, ValueError) as exc:
                raise TranscriptError(f"{where}.stats: {exc}") from None
    return shown


def checked_text(where: str, value: object, max_chars: int) -> str:
    if not isinstance(value, str):
        raise TranscriptError(f"{where} must be text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise TranscriptError(f"{where} is {len(value):,} characters; the limit is {max_chars:,}")
    if "\x00" in value:
        raise TranscriptError(f"{where} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \\u escapes can spell
        raise TranscriptError(f"{where} contains text that is not valid Unicode") from None
    return value


def read_settings(settings: object) -> dict[str, float]:
    if not isinstance(settings, dict):
        raise TranscriptError("settings must be an object of generation settings")
    if unknown := set(settings) - set(PARAMETER_ORDER):
        raise TranscriptError(f"settings has unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    try:
        checked = {
            name: check_value(LIMITS[name], settings[name]) for name in PARAMETER_ORDER if name in settings
        }
    except ValueError as exc:
        raise TranscriptError(f"settings: {exc}") from None
    assert all(math.isfinite(value) for value in checked.values())
    return checked
