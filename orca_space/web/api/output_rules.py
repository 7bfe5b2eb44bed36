"""What a chat completion's reply must look like: `tools` with `tool_choice`, and
`response_format`, read from the request and turned into a grammar (`orca_space/grammar.py`).

- `tool_choice` `none` (or no tools): the tools are left out of the prompt; plain text.
- `auto` (the default with tools): the tools are in the prompt; the model writes text or calls,
  and the grammar takes over once it writes `<tool_call>`.
- `required`, or `{"type": "function", "function": {"name": ...}}`: a call from the first
  token (of that function when named), its arguments matching the tool's parameter schema.
- `response_format` `json_object`: any JSON object; `json_schema`: JSON matching the schema
  (`strict` or not: the schema is always enforced). Not together with tool calls.

Only an engine that applies grammars can honour these (the local batched engine, and the
reference rung through a logits processor); on the remote backend and ZeroGPU they are a named
400, `tool_choice` `none` excepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...grammar import Constraint, GrammarCompiler, GrammarError, ToolSpec
from .openai_schema import ApiError
from .tool_calls import tools_prompt

MAX_TOOLS = 128  # OpenAI's limit
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class OutputRules:
    tools: tuple[dict[str, Any], ...] = ()  # as the client sent them (for the prompt)
    specs: tuple[ToolSpec, ...] = ()
    tool_choice: str = "none"  # none, auto, required, or "function" (forced_name says which)
    forced_name: str | None = None
    parallel: bool = True
    json_schema: Mapping[str, Any] | None = None
    json_mode: bool = False  # response_format json_object or json_schema

    @property
    def calls_possible(self) -> bool:
        return self.tool_choice != "none"

    @property
    def constrained(self) -> bool:
        return self.calls_possible or self.json_mode

    def system_suffix(self) -> str | None:
        """The tool section of the system message, or None when the tools stay out."""
        if not self.calls_possible:
            return None
        return tools_prompt(self.tools, self.forced_name, self.tool_choice == "required")

    def constraint(self, grammars: GrammarCompiler | None) -> Constraint | None:
        """The compiled grammar (milliseconds; call off the event loop), or None when free."""
        if not self.constrained:
            return None
        if grammars is None:
            field = "tool_choice" if self.calls_possible else "response_format"
            raise ApiError(
                f"{field}: constrained decoding (tools, JSON output) needs the model served here; this "
                "Space's backend (a remote server or ZeroGPU) cannot apply a grammar. Send "
                "tool_choice 'none' and no response_format, or serve the model locally",
                param=field,
                code="unsupported_backend",
            )
        try:
            if self.json_mode:
                return grammars.json(self.json_schema)
            specs = [s for s in self.specs if self.forced_name in (None, s.name)]
            return grammars.tool_calls(specs, forced=self.tool_choice != "auto", parallel=self.parallel)
        except GrammarError as exc:
            raise ApiError(
                str(exc), param="response_format" if self.json_mode else "tools", code="invalid_schema"
            ) from None


def read_rules(tools: object, tool_choice: object, parallel: object, response_format: object) -> OutputRules:
    """The request's output rules, or ApiError naming the field that is wrong."""
    specs, listed = read_tools(tools)
    choice, forced = read_tool_choice(tool_choice, specs)
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError("parallel_tool_calls must be true or false", param="parallel_tool_calls")
    json_mode, schema = read_response_format(response_format)
    if json_mode and choice != "none":
        raise ApiError(
            "response_format: JSON output cannot be combined with tool calls; send tool_choice 'none' "
            "or no response_format",
            param="response_format",
        )
    return OutputRules(listed, specs, choice, forced, parallel is not False, schema, json_mode)


def read_tools(tools: object) -> tuple[tuple[ToolSpec, ...], tuple[dict[str, Any], ...]]:
    if tools is None:
        return (), ()
    if not isinstance(tools, list):
        raise ApiError("tools must be a list of function tools", param="tools")
    if len(tools) > MAX_TOOLS:
        raise ApiError(f"at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    specs, names = [], set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if (
            not isinstance(tool, Mapping)
            or tool.get("type") != "function"
            or not isinstance(function, Mapping)
        ):
            raise ApiError(
                f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}}", param=where
            )
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ApiError(
                f"{where}.function.name must be 1 to 64 letters, digits, _ or -",
                param=f"{where}.function.name",
            )
        if name in names:
            raise ApiError(f"{where}.function.name: {name!r} is listed twice", param=f"{where}.function.name")
        parameters = function.get("parameters", NO_PARAMETERS)
        if not isinstance(parameters, Mapping):
            raise ApiError(
                f"{where}.function.parameters must be a JSON schema object",
                param=f"{where}.function.parameters",
            )
        names.add(name)
        specs.append(ToolSpec(name, parameters))
    return tuple(specs), tuple(dict(tool) for tool in tools)


def read_tool_choice(choice: object, specs: tuple[ToolSpec, ...]) -> tuple[str, str | None]:
    if choice is None:
        return ("auto" if specs else "none"), None
    if choice in ("none", "auto", "required"):
        if choice != "none" and not specs:
            raise ApiError(f"tool_choice {choice!r} needs tools", param="tool_choice")
        return ("none" if not specs else choice), None
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(choice, Mapping) or choice.get("type") != "function" or not isinstance(name, str):
        raise ApiError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if name not in {spec.name for spec in specs}:
        raise ApiError(f"tool_choice names {name!r:.70}, which is not in tools", param="tool_choice")
    return "function", name


def read_response_format(response_format: object) -> tuple[bool, Mapping[str, Any] | None]:
    """(JSON output?, its schema or None for any JSON object)."""
    if response_format is None:
        return False, None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind != "json_schema":
        raise ApiError(
            "response_format must be {'type': 'text'}, {'type': 'json_object'} or "
            "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}",
            param="response_format",
        )
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(schema, (Mapping, type(None))):
        raise ApiError(
            "response_format.json_schema must be {'name': ..., 'schema': {...}}",
            param="response_format.json_schema",
        )
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        raise ApiError("response_format.json_schema.strict must be true or false", param="response_format")
    return True, schema
