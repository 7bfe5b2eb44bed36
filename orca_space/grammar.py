"""Grammars for constrained decoding: what a reply may look like, as a token mask per step.

A `Constraint` is a grammar compiled once, when a request is checked (milliseconds, off the
engine's thread); the engine makes a `TokenMatcher` from it per request, which fills that
request's row of the step's token bitmask and is advanced with each sampled token (see
`engines/token_masks.py`). The library is xgrammar (chosen by `bench/grammar_mask.py`: a few
microseconds per token on the 32,002-token vocabulary); this is the one module that imports it.

JSON is compiled with `json.dumps`'s separators (`", "` and `": "`) and no other whitespace: a
random-weight model (or a real one gone astray) cannot spin on blank space, and what it writes
reads like what a model trained on JSON writes. Properties not in a schema are not generated
unless the schema allows them (`additionalProperties`), as vLLM and SGLang compile schemas.
The end of turn (`<|im_end|>`, the tokenizer info's stop id) is allowed only where the grammar
is complete.

Tool calls are Hermes-style (what vLLM's `hermes` parser reads), each one
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, the arguments matching that
tool's parameter schema.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SEPARATORS = (", ", ": ")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# Between `<tool_call>` and the JSON, and between the JSON and `</tool_call>` (Hermes's layout).
CALL_BEGIN, CALL_END = f"{TOOL_CALL_OPEN}\n", f"\n{TOOL_CALL_CLOSE}"
CALL_SEPARATOR = "\n"  # between two calls of one reply
# Whitespace inside a tool call's JSON: structural tags compile JSON with free whitespace, bounded here.
MAX_CALL_WHITESPACE = 1


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled; the message says why (for a 400)."""


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: its name and its parameters' JSON schema."""

    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled grammar: what every reply of one request must match."""

    compiled: Any  # xgrammar.CompiledGrammar
    vocab_size: int
    description: str  # what it constrains to, for logs and errors

    def matcher(self) -> TokenMatcher:
        return TokenMatcher(self)


class TokenMatcher:
    """One request's place in its grammar: fills its mask row, takes each sampled token."""

    def __init__(self, constraint: Constraint) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(constraint.compiled)

    def fill(self, bitmask, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32 on the CPU, one bit per token)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it."""
        return self._matcher.accept_token(token)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


class GrammarCompiler:
    """Compiles schemas and tool lists into `Constraint`s for one tokenizer.

    The tokenizer's table (every token's bytes) is built on first use (a fraction of a second),
    so an app that never constrains a reply never pays for it; compiled grammars are cached by
    the library, so the same schema sent again costs nothing.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self._tokenizer, self.vocab_size, self._stop_ids = tokenizer, vocab_size, list(stop_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def _library(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_ids
                )
                self._compiler = xgrammar.GrammarCompiler(info)
            return self._compiler

    def json(self, schema: Mapping[str, Any] | None) -> Constraint:
        """Any JSON object (`schema` None: OpenAI's `json_object`), or JSON matching `schema`."""
        target = {"type": "object"} if schema is None else bounded_strings_as_patterns(schema)
        text = _schema_text(target)
        compiled = self._compile(
            lambda compiler: compiler.compile_json_schema(
                text, any_whitespace=False, separators=SEPARATORS, strict_mode=True
            ),
            "the JSON schema",
        )
        return Constraint(compiled, self.vocab_size, "a JSON object" if schema is None else "the JSON schema")

    def tool_calls(self, tools: Sequence[ToolSpec], forced: bool, parallel: bool) -> Constraint:
        """Replies made of tool calls. `forced`: one call at least, from the first token (nothing
        else); otherwise text, with the grammar taking over once `<tool_call>` is written. With
        `parallel` several calls may follow each other, else one ends the reply."""
        from xgrammar.structural_tag import (
            JSONSchemaFormat,
            StructuralTag,
            TagFormat,
            TagsWithSeparatorFormat,
            TriggeredTagsFormat,
        )

        call = TagFormat(
            begin=CALL_BEGIN,
            content=JSONSchemaFormat(json_schema=call_schema(tools), max_whitespace_cnt=MAX_CALL_WHITESPACE),
            end=CALL_END,
        )
        if forced:
            shape = TagsWithSeparatorFormat(
                tags=[call], separator=CALL_SEPARATOR, at_least_one=True, stop_after_first=not parallel
            )
        else:
            shape = TriggeredTagsFormat(triggers=[TOOL_CALL_OPEN], tags=[call], stop_after_first=not parallel)
        names = ", ".join(tool.name for tool in tools)
        compiled = self._compile(
            lambda compiler: compiler.compile_structural_tag(StructuralTag(format=shape)),
            f"the parameters of {names}",
        )
        kind = "a call of" if forced else "text or calls of"
        return Constraint(compiled, self.vocab_size, f"{kind} {names}")

    def _compile(self, compile_with, what: str):
        compiler = self._library()
        try:
            return compile_with(compiler)
        except Exception as exc:  # the library raises RuntimeError/ValueError with its reason
            raise GrammarError(f"{what} cannot be compiled into a grammar: {library_reason(exc)}") from None


def call_schema(tools: Sequence[ToolSpec]) -> dict[str, Any]:
    """The JSON of one call: `{"name": <one of the tools>, "arguments": <its parameters>}`."""
    choices = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.name},
                "arguments": bounded_strings_as_patterns(tool.parameters),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return choices[0] if len(choices) == 1 else {"anyOf": choices}


# A JSON string's characters with no escapes: anything but control characters, `"` and `\`.
PLAIN_STRING_CHARACTER = '[^\\x00-\\x1f"\\\\]'
STRING_LENGTH_ONLY = {"type", "minLength", "maxLength", "description", "title", "default", "examples"}


def bounded_strings_as_patterns(schema: object) -> object:
    """The schema with each string bounded by `minLength`/`maxLength` alone rewritten as a
    pattern of that many plain characters. xgrammar 0.2.9 compiles such a string to any
    characters but `"`, `\`, CR and LF, raw control characters included, which is not JSON
    (`json.loads` refuses a tab or U+000F inside a string); its pattern path escapes properly.
    The cost: such strings hold no `"` or `\`."""
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(item) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    rewritten = {key: bounded_strings_as_patterns(value) for key, value in schema.items()}
    bounded = "minLength" in schema or "maxLength" in schema
    if schema.get("type") == "string" and bounded and set(schema) <= STRING_LENGTH_ONLY:
        low, high = schema.get("minLength", 0), schema.get("maxLength", "")
        if isinstance(low, int) and isinstance(high, (int, str)):
            for key in ("minLength", "maxLength"):
                rewritten.pop(key, None)
            rewritten["pattern"] = f"^{PLAIN_STRING_CHARACTER}{{{low},{high}}}$"
    return rewritten


def library_reason(exc: Exception) -> str:
    """The library's reason without its time stamp and C++ source location."""
    lines = str(exc).strip().splitlines()
    reason = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", lines[0]) if lines else type(exc).__name__
    return reason[:300]


def _schema_text(schema: Mapping[str, Any]) -> str:
    try:
        return json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"the JSON schema cannot be read: {exc}") from None
