"""OpenAI's text completions (`POST /v1/completions`): the request and the response shapes.

A raw prompt, continued as it is (no ChatML, see `raw_prompt.py`), with the same sampling fields
as chat completions (`openai_schema.SamplingRequest`). What differs from chat, as OpenAI's
legacy API has it: `prompt` instead of `messages`, `logprobs` a number of alternatives (0 to
20) rather than a switch, `max_tokens` 16 when left out, and `choices[].text` in the answer.
`echo`, `suffix` and `best_of` are refused by name; control tokens written in the prompt stay
text unless `parse_control_tokens` is true.
"""

from __future__ import annotations

from typing import Any

from pydantic import StrictBool, field_validator

from .openai_schema import SamplingRequest, _top_logprobs

# OpenAI's default for this endpoint (chat completions have none).
DEFAULT_MAX_TOKENS = 16


class CompletionRequest(SamplingRequest):
    prompt: Any = None
    logprobs: Any = None  # here a number of alternatives, as in OpenAI's legacy API
    echo: StrictBool = False
    suffix: Any = None
    best_of: Any = None
    # This Space's own opt-in: `<|im_start|>` and the like in the prompt become control tokens.
    parse_control_tokens: StrictBool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def one_text(cls, prompt: object) -> str:
        """A string, or a list holding one (OpenAI's batch of prompts, of one)."""
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            raise ValueError("prompt must be text: token ids are not taken here")
        if isinstance(prompt, list):
            raise ValueError("prompt must be one text; send one request per prompt (or use n)")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
        return prompt

    @field_validator("logprobs", mode="before")
    @classmethod
    def few_alternatives(cls, value: object) -> object:
        return _top_logprobs(value)

    @field_validator("echo")
    @classmethod
    def no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("the prompt is not repeated in the answer here (echo)")
        return echo

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, suffix: object) -> object:
        if suffix not in (None, ""):
            raise ValueError("inserting text (suffix) is not supported")
        return suffix

    @field_validator("best_of")
    @classmethod
    def no_best_of(cls, best_of: object, info) -> object:
        if best_of not in (None, 1, info.data.get("n")):
            raise ValueError("only the n choices asked for are generated (best_of)")
        return best_of

    @property
    def logprob_alternatives(self) -> int | None:
        return self.logprobs
