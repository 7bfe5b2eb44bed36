"""An OpenAI request translated once into what the chat service takes: `to_conversation` turns
a chat request's messages into a system message, history and the message to answer (or the
reply to continue), `prepare` checks and encodes it with the page's own text checks, ChatML
ids and history fitting, and `prepare_text` does the same for a text completion's raw prompt.
Refusals are `ApiError`s that name the field at fault. Nothing of HTTP here (see openai_api.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...chat import MAX_HISTORY_MESSAGE_CHARS, MAX_HISTORY_MESSAGES, ChatService, PreparedChat, check_text
from ...history import PromptTooLong
from ...raw_prompt import prepare_raw_prompt
from . import openai_completions as completions
from . import tool_calls
from .api_errors import error_param, in_api_words, too_long_message
from .openai_completions import CompletionRequest
from .openai_schema import ApiError, ChatCompletionRequest, SamplingRequest
from .output_rules import OutputRules

# A chat request that sets no token limit may use this many (or what the context leaves): a
# long chat answer fits, and a front end's title or tag call that sends none (Open WebUI's)
# cannot run on for thousands of tokens. A cut reply ends with finish_reason "length" and
# can be continued (a conversation ending with its text is continued).
DEFAULT_MAX_TOKENS = 1024


@dataclass(frozen=True)
class Conversation:
    """An OpenAI message list as the chat service takes it."""

    system: str
    history: list[dict[str, str]]
    message: str  # the new user message, or the reply to continue
    message_index: int  # where that message is in `messages`, for errors
    continues: bool = False  # the last message is the assistant's, to continue


def to_conversation(request: ChatCompletionRequest, service: ChatService) -> Conversation:
    """System messages first (several are joined), then the conversation, ending with a user
    message to answer, or with an assistant message to continue (Open WebUI's Continue, vLLM's
    `continue_final_message`): the reply goes on from its last word, as the page's Continue."""
    messages = request.messages
    leading = 0
    while leading < len(messages) and messages[leading].role == "system":
        leading += 1
    for index in range(leading, len(messages)):
        if messages[index].role == "system":
            raise ApiError(
                "system messages are taken only at the start, before the conversation",
                param=f"messages[{index}].role",
            )
    last = len(messages) - 1
    continues = check_ending(request, last)
    if last - leading > MAX_HISTORY_MESSAGES:
        raise ApiError(f"at most {MAX_HISTORY_MESSAGES + 1} messages besides system ones", param="messages")
    limits = service.limits
    # A system message is bounded by the context, in tokens (the fit refuses one too long);
    # characters only bound the work of tokenizing it.
    for index in range(last):
        _check(f"messages[{index}].content", messages[index].content, MAX_HISTORY_MESSAGE_CHARS)
    limit = MAX_HISTORY_MESSAGE_CHARS if continues else limits.max_message_chars
    _check(f"messages[{last}].content", messages[last].content, limit, allow_empty=False)
    return Conversation(
        system="\n\n".join(m.content for m in messages[:leading] if m.content.strip()),
        history=[{"role": m.role, "content": m.content} for m in messages[leading:last]],
        message=messages[last].content,
        message_index=last,
        continues=continues,
    )


def check_ending(request: ChatCompletionRequest, last: int) -> bool:
    """Whether the conversation ends with a reply to continue; vLLM's flags may say so, never
    the opposite (this Space starts no assistant turn after an assistant message)."""
    role = request.messages[last].role
    if role not in ("user", "assistant"):
        raise ApiError(
            "the last message must be a user message, or an assistant message to continue",
            param=f"messages[{last}].role",
        )
    continues = role == "assistant"
    if request.continue_final_message and not continues:
        raise ApiError(
            "continue_final_message needs the last message to be the assistant's",
            param="continue_final_message",
        )
    if continues and (request.continue_final_message is False or request.add_generation_prompt):
        name = "add_generation_prompt" if request.add_generation_prompt else "continue_final_message"
        raise ApiError(
            "a conversation that ends with an assistant message is continued here, not answered by "
            f"a new assistant message; leave out {name}",
            param=name,
        )
    return continues


def _check(name: str, text: str, limit: int, allow_empty: bool = True) -> None:
    try:
        check_text(name, text, limit, allow_empty=allow_empty)
    except ValueError as exc:
        raise ApiError(str(exc), param=name) from None


# API fields that go to the engine as they are (the rest: the page's defaults)
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
)


def sampling(request: SamplingRequest) -> dict[str, object]:
    """The sampling parameters the client set; the page's defaults fill in the rest."""
    raw: dict[str, object] = {
        name: value for name in SAMPLING_FIELDS if (value := getattr(request, name)) is not None
    }
    if request.new_tokens is not None:
        raw["max_new_tokens"] = request.new_tokens[1]
    if request.ignore_eos:
        raw["ignore_eos"] = True
    if (alternatives := request.logprob_alternatives) is not None:
        raw["logprobs"] = alternatives
    return raw


def prepare(
    service: ChatService, request: ChatCompletionRequest, rules: OutputRules | None = None
) -> PreparedChat:
    """Check and encode the request. With no token limit set, the reply may take
    `DEFAULT_MAX_TOKENS`, or the room the prompt leaves when that is less. `rules` (tools,
    response_format) add the tools to the system message and compile the reply's grammar."""
    rules = rules or OutputRules()
    plain = request.model_copy(update={"messages": tool_calls.plain_messages(request.messages)})
    conversation = to_conversation(plain, service)
    if suffix := rules.system_suffix():
        conversation = replace(conversation, system="\n\n".join(filter(None, (conversation.system, suffix))))
    constraint = rules.constraint(getattr(service.backend, "grammars", None))
    raw = sampling(request)
    raw.setdefault("max_new_tokens", 1)  # the prompt must leave room for one token at least
    limit_name = request.new_tokens[0] if request.new_tokens else "max_tokens"
    try:
        chat = encode_conversation(service, conversation, raw)
    except PromptTooLong as exc:
        sent_limit = limit_name if request.new_tokens is not None else None
        message = too_long_message(exc, service, rules, sent_limit)
        raise ApiError(message, param="messages", code="context_length_exceeded") from None
    except ValueError as exc:
        param = error_param(str(exc), conversation, limit_name)
        raise ApiError(in_api_words(str(exc), param), param=param) from None
    context = service.limits.context_length
    if chat.dropped_turns:
        raise ApiError(
            f"the messages do not fit the {context:,}-token context with room for "
            f"{chat.params.max_new_tokens} new tokens (the {chat.dropped_turns} oldest turns would have "
            f"to be left out); send fewer messages or a lower {limit_name}",
            param="messages",
            code="context_length_exceeded",
        )
    chat = with_default_limit(chat, request, context, DEFAULT_MAX_TOKENS)
    return replace(chat, params=replace(chat.params, constraint=constraint))


def encode_conversation(service: ChatService, conversation: Conversation, raw: dict) -> PreparedChat:
    system = conversation.system
    if conversation.continues:
        return service.prepare_continuation(
            [*conversation.history, {"role": "assistant", "content": conversation.message}],
            system,
            raw,
            drop_unanswered=False,
            max_system_chars=MAX_HISTORY_MESSAGE_CHARS,
        )
    return service.prepare(
        conversation.message,
        conversation.history,
        system,
        raw,
        drop_unanswered=False,
        max_system_chars=MAX_HISTORY_MESSAGE_CHARS,
    )


def with_default_limit(
    chat: PreparedChat, request: SamplingRequest, context: int, default: int
) -> PreparedChat:
    """A request that set no token limit gets `default`, or the room the prompt leaves."""
    if request.new_tokens is not None:
        return chat
    room = min(default, context - chat.prompt_tokens)
    return replace(chat, params=replace(chat.params, max_new_tokens=room))


def prepare_text(service: ChatService, request: CompletionRequest) -> PreparedChat:
    """A text completion's raw prompt, checked and encoded (see raw_prompt.py)."""
    raw = sampling(request)
    raw.setdefault("max_new_tokens", min(completions.DEFAULT_MAX_TOKENS, service.limits.context_length - 1))
    try:
        return prepare_raw_prompt(service, request.prompt, raw, request.parse_control_tokens)
    except PromptTooLong as exc:
        raise ApiError(str(exc), param="prompt", code="context_length_exceeded") from None
    except ValueError as exc:
        message = str(exc)
        param = (
            request.new_tokens[0] if message.startswith("max_new_tokens") and request.new_tokens else "prompt"
        )
        raise ApiError(in_api_words(message, param), param=param) from None
