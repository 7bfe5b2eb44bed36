"""OpenAI chat-completions requests and responses, as this Space speaks them.

The request is a pydantic model whose every check names the field that is wrong, in OpenAI's
spelling (`messages[2].content`, `max_tokens`), so a client gets a 400 it can act on. Sampling
values are checked by `params.check_value` under their OpenAI names: the same limits as the
page's sliders (and `params.API_LIMITS` for the API's own: min-p, presence and frequency
penalties). Fields for features this Space does not have (`logit_bias`, images, audio, ...) are
refused by name rather than ignored; fields it has no use for but that change nothing (`user`,
`metadata`, ...) and unknown ones are ignored, as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ...params import API_LIMITS, LIMITS, MAX_TOP_LOGPROBS, check_seed, check_value
from ...replies import ReplyStats

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 200  # each one is matched against the end of the reply after every piece
# Choices per request (`n`): each is a request in the engine, so a few, not a batch's worth.
MAX_CHOICES = 4
# "developer" is OpenAI's newer name for the system role; it is read as one.
SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant", "tool")
NOT_TEXT_PARTS = {"image_url": "images", "input_image": "images", "input_audio": "audio", "file": "files"}


class ApiError(Exception):
    """A refusal in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code
        self.retry_after_s = retry_after_s
        self.allow: str | None = None  # a 405's `Allow` header

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _off(value: object) -> bool:
    return value in (None, False, 0, [], {}, "")


# Field -> (when a value is still fine, why any other is refused).
REFUSED_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "functions": (_off, "the legacy functions field is not supported; send tools"),
    "function_call": (
        lambda v: v in (None, "none", "auto"),
        "the legacy function_call is not supported; send tool_choice",
    ),
    "logit_bias": (_off, "logit_bias is not supported"),
    "audio": (_off, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only text output is supported"),
    "prediction": (_off, "predicted outputs are not supported"),
}


def refuse_unsupported(body: Mapping[str, object]) -> None:
    for name, (fine, why) in REFUSED_FIELDS.items():
        if name in body and not fine(body[name]):
            raise ApiError(f"{name}: {why}", param=name)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it back


class ToolCallMessage(BaseModel):
    """A call an earlier reply made, sent back in the history."""

    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    type: StrictStr = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name`, `refusal`, ...: nothing to do with them

    role: StrictStr
    content: str = ""  # null (an assistant's message with only tool calls) reads as ""
    tool_calls: list[ToolCallMessage] | None = None  # an assistant's calls (web/api/tool_calls.py)
    tool_call_id: StrictStr | None = None  # a `tool` message: which call it answers

    @field_validator("role")
    @classmethod
    def known_role(cls, role: str) -> str:
        if role == "function":
            raise ValueError("role 'function' (the legacy functions API) is not supported; use 'tool'")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r:.40}")
        return "system" if role in SYSTEM_ROLES else role

    @field_validator("content", mode="before")
    @classmethod
    def text_content(cls, content: object) -> str:
        """A string, or a list of text parts (joined by newlines, as vLLM joins them)."""
        if isinstance(content, str):
            return content
        if content is None:
            return ""  # an empty message where one is needed is refused by the chat's checks
        if not isinstance(content, list):
            raise ValueError(f"content must be text or a list of text parts, got {type(content).__name__}")
        texts = []
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in NOT_TEXT_PARTS:
                raise ValueError(
                    f"part {index} is {kind}: {NOT_TEXT_PARTS[kind]} are not supported, only text"
                )
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {index} must be {{'type': 'text', 'text': '...'}}")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="before")
    @classmethod
    def no_tool_calls(cls, data: object) -> object:
        if isinstance(data, Mapping) and not _off(data.get("function_call")):
            raise ValueError("function_call (the legacy functions API) is not supported; send tool_calls")
        if isinstance(data, Mapping) and not _off(data.get("tool_calls")) and data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


def _limit_check(limit_name: str, openai_name: str) -> Callable[[object], object]:
    limit = replace({**LIMITS, **API_LIMITS}[limit_name], name=openai_name)  # named as the client named it
    return lambda value: None if value is None else check_value(limit, value)


def _top_k(value: object) -> object:
    """vLLM's -1 means "off", as 0 does here."""
    return 0 if value == -1 and not isinstance(value, bool) else _limit_check("top_k", "top_k")(value)


def _choices(value: object) -> object:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHOICES:
        raise ValueError(f"n must be a whole number from 1 to {MAX_CHOICES}, got {value!r:.40}")
    return value


def _top_logprobs(value: object) -> object:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ValueError(
            f"top_logprobs must be a whole number from 0 to {MAX_TOP_LOGPROBS}, got {value!r:.40}"
        )
    return value


# The page's limits under OpenAI's names; null means "not set" for each.
SAMPLING_CHECKS: dict[str, Callable[[object], object]] = {
    "max_tokens": _limit_check("max_new_tokens", "max_tokens"),
    "max_completion_tokens": _limit_check("max_new_tokens", "max_completion_tokens"),
    "temperature": _limit_check("temperature", "temperature"),
    "top_p": _limit_check("top_p", "top_p"),
    "top_k": _top_k,
    "repetition_penalty": _limit_check("repetition_penalty", "repetition_penalty"),
    "seed": lambda value: None if value is None else check_seed(value),
    "min_p": _limit_check("min_p", "min_p"),
    "presence_penalty": _limit_check("presence_penalty", "presence_penalty"),
    "frequency_penalty": _limit_check("frequency_penalty", "frequency_penalty"),
    "n": _choices,
}


class SamplingRequest(BaseModel):
    """What chat and text completions share: the model, the reply's limits and its sampling."""

    model_config = ConfigDict(extra="allow")  # unknown fields are ignored (and logged)

    model: StrictStr | None = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    temperature: Any = None
    top_p: Any = None
    top_k: Any = None  # not in OpenAI's schema; vLLM takes it, and so does this
    repetition_penalty: Any = None  # likewise
    seed: Any = None
    min_p: Any = None  # vLLM's
    presence_penalty: Any = None
    frequency_penalty: Any = None
    n: Any = None
    ignore_eos: StrictBool = False  # vLLM's: go on past the end of the turn, to the token limit
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # Read and checked by web/api/output_rules.py: tools and JSON output by constrained decoding.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None

    @field_validator(*SAMPLING_CHECKS, mode="before")
    @classmethod
    def in_range(cls, value: object, info) -> object:
        return SAMPLING_CHECKS[info.field_name](value)

    @field_validator("stop", mode="after")
    @classmethod
    def few_short_stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        for text in stops:
            if not text or len(text) > MAX_STOP_CHARS:
                raise ValueError(
                    f"each stop string must be 1 to {MAX_STOP_CHARS} characters, got {len(text)}"
                )
        return stops

    @property
    def new_tokens(self) -> tuple[str, int] | None:
        """(field name, value) of the reply's token limit, if the client set one."""
        for name in ("max_completion_tokens", "max_tokens"):
            if (value := getattr(self, name)) is not None:
                return name, value
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def logprob_alternatives(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: none asked."""
        return None

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool | None = None
    top_logprobs: Any = None
    # vLLM's: a conversation that ends with an assistant message is continued either way; these
    # say so explicitly, and a contradiction is refused (see `openai_requests.to_conversation`).
    continue_final_message: StrictBool | None = None
    add_generation_prompt: StrictBool | None = None

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def few_alternatives(cls, value: object) -> object:
        return _top_logprobs(value)

    @property
    def logprob_alternatives(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: none asked."""
        return (self.top_logprobs or 0) if self.logprobs else None


Request = TypeVar("Request", bound=SamplingRequest)


def parse_request(body: object, kind: type[Request] = ChatCompletionRequest) -> Request:
    """The request, or ApiError naming the first field that is wrong."""
    if not isinstance(body, Mapping):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    refuse_unsupported(body)
    try:
        request = kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ApiError(_plain(first["msg"]), param=field_path(first["loc"])) from None
    if isinstance(request, ChatCompletionRequest) and request.top_logprobs and not request.logprobs:
        raise ApiError("top_logprobs needs logprobs set to true", param="top_logprobs")
    both = (request.max_tokens, request.max_completion_tokens)
    if None not in both and both[0] != both[1]:
        raise ApiError(
            "max_tokens and max_completion_tokens differ; send one of them", param="max_completion_tokens"
        )
    return request


def field_path(loc: tuple) -> str:
    """("messages", 2, "content") -> "messages[2].content"; pydantic's union branches dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[str]") or "[" in str(part):  # which union branch failed
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def _plain(message: str) -> str:
    return message.removeprefix("Value error, ")


# -- responses ------------------------------------------------------------------------------------


def usage(stats: Sequence[ReplyStats]) -> dict[str, int]:
    """One prompt, however many choices: its tokens once, every choice's new tokens."""
    prompt, new = stats[0].prompt_tokens, sum(s.tokens for s in stats)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


@dataclass(frozen=True)
class Shape:
    """How an answer's choices are written: chat completions, or text completions."""

    whole: str  # the answer's `object`
    piece: str  # a streamed chunk's `object`
    id_prefix: str
    text_key: str | None  # where a choice's text goes: "text", or None for chat's message/delta

    def new_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: Any, streamed: bool) -> dict:
        body: dict[str, Any] = {"index": index}
        if self.text_key is not None:
            body[self.text_key] = text
        elif streamed:
            body["delta"] = {"content": text} if text else {}
        else:
            body["message"] = {"role": "assistant", "content": text}
        return {**body, "logprobs": logprobs, "finish_reason": finish_reason}

    def opening(self, index: int) -> dict | None:
        """A stream's first chunk for a choice: chat's says who speaks; text has none."""
        if self.text_key is not None:
            return None
        return {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }


CHAT = Shape("chat.completion", "chat.completion.chunk", "chatcmpl", None)
TEXT = Shape("text_completion", "text_completion", "cmpl", "text")


def completion_id() -> str:
    return CHAT.new_id()


def envelope(
    shape: Shape, id_: str, model: str, created: int, choices: list[dict], streamed: bool, **usage_field: Any
) -> dict[str, Any]:
    """The answer (or a chunk of it) around its choices; `usage=...` when it has one (a chunk's
    `usage` is null on every chunk but the last, usage-only one, as OpenAI sends it)."""
    body = {
        "id": id_,
        "object": shape.piece if streamed else shape.whole,
        "created": created,
        "model": model,
        "choices": choices,
    }
    return {**body, **usage_field}


def completion(
    id_: str, model: str, text: str, finish_reason: str, stats: ReplyStats, created: int | None = None
) -> dict[str, Any]:
    """A chat answer of one choice."""
    choice = CHAT.choice(0, text, finish_reason, None, streamed=False)
    return envelope(CHAT, id_, model, created or int(time.time()), [choice], False, usage=usage([stats]))


def model_list(model: str, created: int, context_length: int) -> dict[str, Any]:
    entry = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "orca-space",
        "max_model_len": context_length,  # vLLM's extra field: clients use it to budget prompts
    }
    return {"object": "list", "data": [entry]}
