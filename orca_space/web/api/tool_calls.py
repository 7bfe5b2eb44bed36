"""Tool calling for a model that has no tool format of its own, in OpenAI's shape.

The format is Hermes's (NousResearch Hermes 2 Pro; what vLLM's `hermes` tool parser reads):

- the tools are described at the end of the system message (`tools_prompt`) inside
  `<tools></tools>`, one a line, each as compact JSON of its `name`, `description` and
  `parameters` (`tool_line`: OpenAI's wrapper and the schema's annotations that constrain
  nothing, such as pydantic's `title` on every field, left out: a front end such as Open WebUI
  sends 36 tools with every chat, and their prompt must leave the conversation room);
- a call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the reply,
  written under a grammar (`orca_space/grammar.py`), so it is valid JSON matching its tool's
  parameter schema;
- in the history, an assistant message's `tool_calls` are written back in that layout after
  its text, and `tool` messages (the results) become a user turn of
  `<tool_response>\\n{content}\\n</tool_response>` blocks, one per result, as Qwen's ChatML
  template writes them. All of it is plain text to `chatml.py`: a `<|im_start|>` inside a
  result or an argument stays text, as everywhere else.

`split_reply` turns a whole reply into content and calls; `tool_stream.py` does it as it streams.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...grammar import CALL_BEGIN, CALL_END, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from .openai_schema import ChatMessage

TOOLS_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available tools: "
    "<tools>\n{tools}\n</tools>\n"
    "For each function call, return a json object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
MUST_CALL = "\nYou must call a function now."
MUST_CALL_NAMED = "\nYou must call the function {name} now."


# Schema keywords that only annotate (JSON Schema's "meta-data" vocabulary and $-keys):
# the grammar ignores them too. `description`, `default` and `examples` tell the model
# something and stay.
ANNOTATIONS = frozenset({"title", "$schema", "$id", "$comment", "readOnly", "writeOnly", "deprecated"})
# Keywords whose value maps names to schemas, and those whose value is one schema or a list.
SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
SCHEMA_VALUES = frozenset(
    {
        "items",
        "additionalProperties",
        "not",
        "if",
        "then",
        "else",
        "contains",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "anyOf",
        "oneOf",
        "allOf",
        "prefixItems",
    }
)


def tools_prompt(tools: Sequence[Mapping[str, Any]], forced_name: str | None, required: bool) -> str:
    """The system message's tool section: each tool on a line of its own (`tool_line`)."""
    text = TOOLS_PROMPT.format(tools="\n".join(tool_line(tool) for tool in tools))
    if forced_name is not None:
        return text + MUST_CALL_NAMED.format(name=forced_name)
    return text + MUST_CALL if required else text


def tool_line(tool: Mapping[str, Any]) -> str:
    """A tool as the model reads it: `{"name":...,"description":...,"parameters":...}` in
    compact JSON, the parameter schema without its annotations."""
    function = tool.get("function", {})
    entry = {key: function[key] for key in ("name", "description") if function.get(key)}
    if "parameters" in function:
        entry["parameters"] = without_annotations(function["parameters"])
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def without_annotations(schema: Any) -> Any:
    """`schema` less the keywords in `ANNOTATIONS`, at every level; a property *named* `title`
    stays (only schema objects lose keywords, never the name maps inside them)."""
    if not isinstance(schema, Mapping):
        return schema
    kept: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key in SCHEMA_MAPS and isinstance(value, Mapping):
            kept[key] = {name: without_annotations(sub) for name, sub in value.items()}
        elif key in SCHEMA_VALUES and isinstance(value, list):
            kept[key] = [without_annotations(sub) for sub in value]
        elif key in SCHEMA_VALUES:
            kept[key] = without_annotations(value)
        else:
            kept[key] = value
    return kept


# -- history -------------------------------------------------------------------------------------


def call_text(name: str, arguments: object) -> str:
    """One call as the model writes it; `arguments` is the JSON text clients send back (kept
    as it is when it is not JSON: the model should see what it wrote)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_BEGIN}{body}{CALL_END}"


def assistant_text(content: str, calls: Iterable[tuple[str, object]]) -> str:
    """An assistant message with tool calls, as the reply that made them read."""
    parts = [content] if content else []
    parts += [call_text(name, arguments) for name, arguments in calls]
    return "\n".join(parts)


def tool_results_text(results: Iterable[str]) -> str:
    """Consecutive `tool` messages, as the one user turn that brings their results."""
    return "\n".join(f"<tool_response>\n{result}\n</tool_response>" for result in results)


# -- replies --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_message_part(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(text: str, index: int) -> ToolCall | None:
    """The JSON between `<tool_call>` and `</tool_call>`, or None if it is not a call."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return None
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    return ToolCall(index, new_call_id(), call["name"], arguments)


class ReplySplitter:
    """Splits a reply's text, piece by piece, into content and tool calls.

    `feed` returns what is certain so far: content up to a possible start of `<tool_call>` (a
    partial one is held back), and each call once its `</tool_call>` has come. `finish` returns
    the rest (an unfinished call, cut by the token limit, is content: it is no call).
    """

    def __init__(self) -> None:
        self._pending = ""
        self._in_call = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[str | ToolCall]:
        self._pending += text
        out: list[str | ToolCall] = []
        while True:
            if not self._in_call:
                start = self._pending.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = partial_suffix(self._pending, TOOL_CALL_OPEN)
                    self._content(out, self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep :]
                    return out
                self._content(out, self._pending[:start])
                self._pending, self._in_call = self._pending[start:], True
            end = self._pending.find(TOOL_CALL_CLOSE)
            if end < 0:
                return out
            whole = self._pending[: end + len(TOOL_CALL_CLOSE)]
            self._pending, self._in_call = self._pending[len(whole) :], False
            call = parse_call(whole[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)].strip(), len(self.calls))
            if call is None:
                self._content(out, whole)
            else:
                self.calls.append(call)
                out.append(call)

    def finish(self) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        self._content(out, self._pending)
        self._pending = ""
        return out

    def _content(self, out: list[str | ToolCall], text: str) -> None:
        # Once a call is made, the blank lines between calls are layout, not content.
        if text and not (self.calls and not text.strip()):
            out.append(text)


def partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def split_reply(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's content (None when there is none besides calls) and its calls."""
    splitter = ReplySplitter()
    pieces = [*splitter.feed(text), *splitter.finish()]
    content = "".join(piece for piece in pieces if isinstance(piece, str))
    if splitter.calls:
        content = content.strip()
    return (content or None) if splitter.calls else content, splitter.calls


def plain_messages(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The history with tool calls and results written as text in user and assistant turns
    (see the module docstring); other messages as they are."""
    plain: list[ChatMessage] = []
    results: list[str] = []
    for message in messages:
        if message.role == "tool":
            results.append(message.content)
            continue
        if results:
            plain.append(ChatMessage(role="user", content=tool_results_text(results)))
            results = []
        if message.tool_calls:
            calls = [(call.function.name, call.function.arguments) for call in message.tool_calls]
            message = ChatMessage(role="assistant", content=assistant_text(message.content, calls))
        plain.append(message)
    if results:
        plain.append(ChatMessage(role="user", content=tool_results_text(results)))
    return plain


def finish_reason(reason: str, made_calls: bool) -> str:
    """OpenAI's "tool_calls" for a reply that ended by itself after making calls."""
    return "tool_calls" if made_calls and reason == "stop" else reason


def with_calls(choice: dict[str, Any], text: str) -> dict[str, Any]:
    """A whole chat choice whose reply `text` made calls, with them as `tool_calls` and finish
    reason "tool_calls"; a reply without calls as it was."""
    content, made = split_reply(text)
    if not made:
        return choice
    message = {
        "role": "assistant",
        "content": content,
        "tool_calls": [call.as_message_part() for call in made],
    }
    return {**choice, "message": message, "finish_reason": finish_reason(choice["finish_reason"], True)}
