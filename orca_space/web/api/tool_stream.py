"""A streamed reply's tool calls as OpenAI streams them: for each call, a first delta with its
index, id, type and name (as soon as `{"name": ..., "arguments": ` has come), then the
arguments' JSON text in fragments as the model writes it; content outside calls as content.

The grammar (`orca_space/grammar.py`) makes a call `{"name": ..., "arguments": {...}}` with the
name first, so the name is known before the arguments start. The end of the arguments is known
only at `</tool_call>`: until then everything from the last `}` on is held back (it may be the
call's own closing brace), so the fragments always join into the arguments' JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ...grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from .tool_calls import new_call_id, parse_call, partial_suffix

CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True)
class CallHead:
    index: int
    id: str
    name: str

    def delta(self) -> dict[str, Any]:
        call = {"index": self.index, "id": self.id, "type": "function"}
        return {"tool_calls": [{**call, "function": {"name": self.name, "arguments": ""}}]}


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str

    def delta(self) -> dict[str, Any]:
        return {"tool_calls": [{"index": self.index, "function": {"arguments": self.text}}]}


Piece = str | CallHead | CallArguments


class StreamingSplitter:
    """Feed the reply's text as it comes; get content, call heads and argument fragments."""

    def __init__(self) -> None:
        self._pending = ""  # outside a call: text not yet sent; inside: the call since <tool_call>
        self._in_call = False
        self._head: CallHead | None = None
        self._arguments_at = 0  # where the arguments start in `_pending`, once the head is known
        self._sent = 0  # characters of the arguments sent so far
        self.calls = 0  # calls completed

    def feed(self, text: str) -> list[Piece]:
        self._pending += text
        out: list[Piece] = []
        while True:
            if not self._in_call and not self._enter_call(out):
                return out
            end = self._pending.find(TOOL_CALL_CLOSE)
            self._find_head(out, end)
            if end < 0:
                self._send_safe_arguments(out)
                return out
            self._close_call(out, end)

    def finish(self) -> list[Piece]:
        """The rest: text after the last call; a call cut short stays as far as it was sent (or,
        if even its name had not come, is content)."""
        out: list[Piece] = []
        if not self._in_call:
            self._content(out, self._pending)
        elif self._head is None:
            self._content(out, TOOL_CALL_OPEN + self._pending)
        self._pending = ""
        return out

    @property
    def made_calls(self) -> bool:
        return self.calls > 0

    def _enter_call(self, out: list[Piece]) -> bool:
        start = self._pending.find(TOOL_CALL_OPEN)
        if start < 0:
            keep = partial_suffix(self._pending, TOOL_CALL_OPEN)
            self._content(out, self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
            return False
        self._content(out, self._pending[:start])
        self._pending, self._in_call = self._pending[start + len(TOOL_CALL_OPEN) :], True
        self._head, self._sent = None, 0
        return True

    def _find_head(self, out: list[Piece], end: int) -> None:
        if self._head is not None:
            return
        match = CALL_HEAD.match(self._pending)
        if match is None or (end >= 0 and match.end() > end):
            return
        try:
            name = json.loads(f'"{match.group(1)}"')
        except json.JSONDecodeError:
            return
        self._head = CallHead(self.calls, new_call_id(), name)
        self._arguments_at = match.end()
        out.append(self._head)

    def _send_safe_arguments(self, out: list[Piece]) -> None:
        if self._head is None:
            return
        body = self._pending[self._arguments_at :]
        safe = body[: body.rfind("}")] if "}" in body else body
        self._send(out, safe)

    def _close_call(self, out: list[Piece], end: int) -> None:
        whole = self._pending[:end]
        self._pending, self._in_call = self._pending[end + len(TOOL_CALL_CLOSE) :], False
        if self._head is None:  # not a call's shape after all: show it as it was written
            call = parse_call(whole.strip(), self.calls)
            if call is None:
                self._content(out, TOOL_CALL_OPEN + whole + TOOL_CALL_CLOSE)
                return
            self._head = CallHead(self.calls, call.id, call.name)
            out += [self._head, CallArguments(self.calls, call.arguments)]
        else:
            arguments = whole[self._arguments_at :].rstrip().removesuffix("}").rstrip()
            self._send(out, arguments)
        self.calls += 1
        self._head = None

    def _send(self, out: list[Piece], arguments: str) -> None:
        assert self._head is not None
        if len(arguments) > self._sent:
            out.append(CallArguments(self._head.index, arguments[self._sent :]))
            self._sent = len(arguments)

    def _content(self, out: list[Piece], text: str) -> None:
        # Once a call is made, the blank lines between calls are layout, not content.
        if text and not (self.calls and not text.strip()):
            out.append(text)


def stream_deltas(pieces: list[Piece]) -> list[dict[str, Any]]:
    """The chunk deltas for these pieces."""
    return [{"content": piece} if isinstance(piece, str) else piece.delta() for piece in pieces]


def text_deltas(splitter: StreamingSplitter | None, text: str, last: bool) -> list[dict[str, Any]]:
    """A piece of the answer as chunk deltas: its text, or (tools offered: a splitter) its
    content, call heads and argument fragments; `last`: the answer's final piece."""
    if splitter is None:
        return [{"content": text}] if text else []
    return stream_deltas(splitter.feed(text) + (splitter.finish() if last else []))
