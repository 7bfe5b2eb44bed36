"""Raw prompts, for the API's text completions (`POST /v1/completions`): text in, ids out, no ChatML.

A raw prompt is the caller's whole prompt, so there is no turn in it to forge; still, control
tokens written in it (`<|im_start|>`, `</s>`) are text by default, as everywhere else in this
Space, so that text pasted from elsewhere means what it says. A caller who writes ChatML by hand
opts in with `control_tokens` (the API's `"parse_control_tokens": true`), as vLLM always reads
them. The ids are what `tokenizer(prompt)` gives, BOS first, as vLLM encodes a prompt.
"""

from __future__ import annotations

from collections.abc import Mapping

from .chat import MAX_HISTORY_MESSAGE_CHARS, ChatService, PreparedChat, check_text
from .history import PromptTooLong
from .params import SamplingParams

MAX_PROMPT_CHARS = MAX_HISTORY_MESSAGE_CHARS  # bounds the tokenizing; the context bounds the rest


def encode_raw_prompt(tokenizer, text: str, control_tokens: bool = False) -> list[int]:
    """`text`'s ids with BOS first; control-token strings in it stay text unless `control_tokens`."""
    return tokenizer(text, add_special_tokens=True, split_special_tokens=not control_tokens).input_ids


def prepare_raw_prompt(
    service: ChatService, prompt: object, raw_params: Mapping[str, object], control_tokens: bool = False
) -> PreparedChat:
    """The prompt checked and encoded for `ChatService.stream`; ValueError (PromptTooLong when it
    does not fit the context with its new tokens) naming the problem."""
    backend = service.backend
    if not getattr(backend, "completes_prompts", False):
        raise ValueError("this backend cannot complete raw prompts; use chat completions")
    text = check_text("prompt", prompt, MAX_PROMPT_CHARS, allow_empty=False)
    params = SamplingParams.from_raw(**raw_params)
    ids = encode_raw_prompt(backend.tokenizer, text, control_tokens)
    context = service.limits.context_length
    if len(ids) + params.max_new_tokens > context:
        raise PromptTooLong(
            f"the prompt is {len(ids):,} tokens; with {params.max_new_tokens} new tokens it does not fit "
            f"the {context:,}-token context; shorten it or ask for fewer tokens",
            needed=len(ids),
            budget=context - params.max_new_tokens,
        )
    return PreparedChat([], params, len(ids), 0, prompt_ids=tuple(ids))
