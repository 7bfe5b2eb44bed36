"""The chat service: from what the browser sends to a stream of growing replies.

It checks every input (nothing from the browser is trusted, history included), fits the
history to the context by whole turns, and streams the reply from a `ChatBackend`: the local
engine or a remote server. It knows nothing of gradio; `web/page/replying.py` maps its errors to the page.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Protocol

from .chatml import ChatEncoder
from .detokenizer import StreamingDetokenizer
from .engines.requests import Engine, EngineError
from .grammar import GrammarCompiler
from .history import FittedChat, Message, fit_history, group_turns
from .params import SamplingParams
from .replies import Reply, ReplyDelta, accumulate, coalesce
from .stop_strings import cut_at_stops
from .throughput import ThroughputMeter

if TYPE_CHECKING:
    from .metrics import ReplyMetrics

# The model card's own system message: what a chat starts with on the page and in the MCP tool.
DEFAULT_SYSTEM_MESSAGE = (
    "You are MistralOrca, a large language model trained by Alignment Lab AI. "
    "Write out your reasoning step-by-step to be sure you get the right answers!"
)
MAX_MESSAGE_CHARS = 16_000
MAX_SYSTEM_CHARS = 8_000
MAX_HISTORY_MESSAGES = 1_000
# History holds replies too (up to thousands of tokens each); this only bounds the work per request.
MAX_HISTORY_MESSAGE_CHARS = 100_000
# At most 20 screen updates a second per reply. Each update costs gradio about 0.25 ms of server
# CPU (measured on a 2-core machine), on the event loop that every stream shares with the GIL
# the engine thread needs: one update per token would cost 0.75 s of CPU a second at 3,000
# tokens/s over 64 streams. Faster repaints only show text sooner than anyone reads it.
UPDATE_INTERVAL_S = 0.05
# What a reply cut by the server's own shutdown (the engine closing under it) tells the user.
SHUTTING_DOWN = "the server is shutting down, so this reply was cut short; try again once it is back"
# Tokens of the reply so far that a continuation's detokenizer reads first, so that the first
# new piece decodes as it would have inside the reply (a word's leading space kept).
CONTINUATION_CONTEXT_TOKENS = 8


@dataclass(frozen=True)
class ChatLimits:
    context_length: int = 8192
    max_message_chars: int = MAX_MESSAGE_CHARS
    max_system_chars: int = MAX_SYSTEM_CHARS
    max_input_tokens: int = 4096
    update_interval_s: float = UPDATE_INTERVAL_S  # see UPDATE_INTERVAL_S


@dataclass(frozen=True)
class PreparedChat:
    messages: list[Message]  # ends with the new user message, or with the reply to continue
    params: SamplingParams
    prompt_tokens: int
    dropped_turns: int
    left_out: tuple[Message, ...] = ()  # the dropped turns' messages, oldest first
    # A raw prompt's ids (the API's text completions, see raw_prompt.py): no messages, no ChatML.
    prompt_ids: tuple[int, ...] | None = None

    @property
    def continues_reply(self) -> bool:
        return continues_reply(self.messages)


def continues_reply(messages: Sequence[Message]) -> bool:
    """A prompt that ends with the assistant's message goes on with that reply: a new reply
    always follows a user message."""
    return bool(messages) and messages[-1]["role"] == "assistant"


Notify = Callable[[str], None]  # shows the user a short notice (the UI passes gr.Info)


class ChatBackend(Protocol):
    """Where replies come from. `stream_reply` yields `ReplyDelta`s and raises `EngineError`.

    `cache_scope` names the visitor (as the web layer identifies them, e.g. "session:…",
    "key:0", "ip:…"): a backend that keeps what earlier prompts computed lets a prompt start
    only from that visitor's (see engines/prefix_cache.py); None shares nothing.
    """

    def stream_reply(
        self,
        messages: list[Message],
        params: SamplingParams,
        notify: Notify | None = None,
        cache_scope: str | None = None,
    ) -> AsyncIterator[ReplyDelta]: ...


class ChatService:
    def __init__(
        self,
        backend: ChatBackend,
        encoder: ChatEncoder,
        limits: ChatLimits,
        meter: ThroughputMeter | None = None,
        metrics: ReplyMetrics | None = None,
    ) -> None:
        self.backend = backend
        self.encoder = encoder
        self.limits = limits
        self.meter = meter or ThroughputMeter()  # tokens streamed by every reply, for the page
        self.metrics = metrics  # time to first token and between tokens, for /metrics
        self._fixed_cost = len(encoder.prefix) + len(encoder.reply_header)

    @property
    def continues_replies(self) -> bool:
        """Whether the backend can go on with a reply (`prepare_continuation`)."""
        return getattr(self.backend, "continues_replies", False)

    def prepare(
        self,
        message: object,
        history: object,
        system_message: object,
        raw_params: Mapping[str, object],
        drop_unanswered: bool = True,
        max_system_chars: int | None = None,
    ) -> PreparedChat:
        """Validate everything and fit the history; raises ValueError naming the problem.

        The page's history holds user messages that got no reply (refused, stopped), which
        `drop_unanswered` leaves out; an API client's consecutive user messages are all meant.
        `max_system_chars` overrides the limit's characters (an API caller's system message
        is bounded by the context in tokens instead).
        """
        new_user = self.check_message(message)
        system = self._check_system(system_message, max_system_chars)
        params = SamplingParams.from_raw(**raw_params)
        past = normalize_history(history)
        if drop_unanswered:
            past = answered_turns(past)
        fitted = self._fit(system, past, new_user, params)
        return prepared(fitted, params, past)

    def check_message(self, message: object) -> Message:
        """The new user message, if it can be sent at all (text, not empty, within the limits
        in characters and tokens); raises ValueError naming the problem. The page asks this
        before a message joins the chat (`web/page/message_checks.py`)."""
        text = check_text("message", message, self.limits.max_message_chars, allow_empty=False)
        new_user = {"role": "user", "content": text}
        if (tokens := self._message_cost(new_user)) > self.limits.max_input_tokens:
            raise ValueError(f"message is {tokens:,} tokens; the limit is {self.limits.max_input_tokens:,}")
        return new_user

    def prepare_continuation(
        self,
        history: object,
        system_message: object,
        raw_params: Mapping[str, object],
        drop_unanswered: bool = True,
        max_system_chars: int | None = None,
    ) -> PreparedChat:
        """The prompt that goes on with the last reply in `history` (cut by max new tokens, or
        stopped): the same assistant turn, left open. Raises ValueError naming the problem.
        `drop_unanswered` and `max_system_chars` as for `prepare`."""
        if not self.continues_replies:  # a remote server would start a new turn instead
            raise ValueError("this backend cannot continue a reply")
        system = self._check_system(system_message, max_system_chars)
        params = SamplingParams.from_raw(**raw_params)
        past = normalize_history(history)
        if drop_unanswered:
            past = answered_turns(past)
        if not continues_reply(past) or not past[-1]["content"].strip():
            raise ValueError("there is no reply to continue: the conversation must end with a reply")
        if len(past) < 2 or past[-2]["role"] != "user":
            raise ValueError("the reply to continue must answer a user message")
        *earlier, question, reply = past
        # The open turn stands where a new reply's header would: what it costs beyond that header
        # counts for this prompt only, so the start stays the one its turn had (history.py).
        open_cost = len(self.encoder.open_turn(reply["content"])) - len(self.encoder.reply_header)
        fitted = self._fit(system, earlier, question, params, open_cost)
        return prepared(fitted, params, earlier, continued=reply)

    def _check_system(self, system_message: object, max_chars: int | None) -> str:
        return check_text("system message", system_message, max_chars or self.limits.max_system_chars)

    def _fit(
        self, system: str, past: list[Message], last_user: Message, params: SamplingParams, open_cost: int = 0
    ) -> FittedChat:
        budget = self.limits.context_length - params.max_new_tokens
        if budget <= 0:
            raise ValueError(
                f"max_new_tokens ({params.max_new_tokens}) must be below the context length "
                f"({self.limits.context_length})"
            )
        return fit_history(
            system={"role": "system", "content": system} if system.strip() else None,
            history=past,
            new_user=last_user,
            budget=budget,
            message_cost=self._message_cost,
            fixed_cost=self._fixed_cost,
            open_cost=open_cost,
        )

    def _message_cost(self, message: Message) -> int:
        return len(self.encoder.encode_message(message["role"], message["content"]))

    async def stream(
        self,
        chat: PreparedChat,
        notify: Notify | None = None,
        cache_scope: str | None = None,
        stops: Sequence[str] = (),
    ) -> AsyncIterator[Reply]:
        """The reply so far with its figures, growing with each item (what a chat window shows),
        at most one update per `update_interval_s` (see `replies.coalesce`). With `stops` it
        ends before the first stop string (`stop_strings.cut_at_stops`, finish reason "stop").
        `cache_scope`: who is asking (see `ChatBackend`)."""
        started = monotonic()
        if chat.prompt_ids is not None:
            deltas = self.backend.stream_prompt(list(chat.prompt_ids), chat.params, notify, cache_scope)
        else:
            deltas = self.backend.stream_reply(chat.messages, chat.params, notify, cache_scope)
        if self.metrics is not None:
            deltas = self.metrics.observe(deltas, started)
        updates = accumulate(deltas, chat.prompt_tokens, started)
        if stops:  # cut at each update, then coalesce: a stop is seen (and the reply ended) at once
            updates = cut_at_stops(updates, stops)
        updates = coalesce(updates, self.limits.update_interval_s)
        if self.metrics is not None:  # after the cut: a stop string ends a reply as a stop
            updates = self.metrics.count_ending(updates)
        counted = 0
        async with contextlib.aclosing(updates):
            async for reply in updates:
                self.meter.add(reply.stats.tokens - counted)
                counted = reply.stats.tokens
                yield reply


def prepared(
    fitted: FittedChat, params: SamplingParams, past: list[Message], continued: Message | None = None
) -> PreparedChat:
    """The fitted chat (plus the open reply, when continuing) with the turns it left out."""
    left_out = tuple(m for turn in group_turns(past)[: fitted.dropped_turns] for m in turn)
    messages = fitted.messages if continued is None else [*fitted.messages, continued]
    return PreparedChat(messages, params, fitted.prompt_tokens, fitted.dropped_turns, left_out)


def check_text(name: str, value: object, max_chars: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} is empty")
    if len(value) > max_chars:
        raise ValueError(f"{name} is {len(value):,} characters; the limit is {max_chars:,}")
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character")
    if (where := lone_surrogate(value)) is not None:
        raise ValueError(f"{name} {where}")
    return value


def lone_surrogate(text: str) -> str | None:
    """Where `text` holds half of a UTF-16 surrogate pair ("\\ud800" in JSON), which is no character
    and cannot be encoded (the tokenizer raised TypeError on it), as words; None when it holds none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X} at character {exc.start:,}), which is not text"
    return None


def normalize_history(history: object, max_chars: int = MAX_HISTORY_MESSAGE_CHARS) -> list[Message]:
    """Check history from the browser: user and assistant turns of text, nothing else."""
    if history is None:
        return []
    if not isinstance(history, Sequence) or isinstance(history, (str, bytes)):
        raise ValueError("history must be a list of messages")
    if len(history) > MAX_HISTORY_MESSAGES:
        raise ValueError(f"history has {len(history)} messages; the limit is {MAX_HISTORY_MESSAGES}")
    messages = []
    for index, item in enumerate(history):
        if not isinstance(item, Mapping) or "role" not in item or "content" not in item:
            raise ValueError(f"history[{index}] must be a message with a role and a content")
        role = item["role"]
        if role not in ("user", "assistant"):
            # The system turn comes only from the system-message box, never from history.
            raise ValueError(f"history[{index}] has role {role!r}; only 'user' and 'assistant' are allowed")
        content = message_text(item["content"], f"history[{index}]")
        messages.append({"role": role, "content": check_text(f"history[{index}]", content, max_chars)})
    return messages


def answered_turns(history: list[Message]) -> list[Message]:
    """Leave out user messages that got no reply (refused, failed, or stopped before a token):
    the model should not see a message the user was told was not sent."""
    return [
        message
        for index, message in enumerate(history)
        if message["role"] == "assistant"
        or (index + 1 < len(history) and history[index + 1]["role"] == "assistant")
    ]


def message_text(content: object, where: str) -> str:
    """Gradio sends content as a string or as a list of typed parts; keep the text parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise ValueError(f"{where} has content this chat cannot read (only text is supported)")
    return "".join(texts)


def queue_notice(place: int, capacity: int) -> str:
    if capacity == 1:
        return (
            f"The model is writing someone else's reply: you are number {place} in line, "
            "and yours starts when it is done."
        )
    return (
        f"All {capacity} reply slots are busy: you are number {place} in line, "
        "and your reply starts when a slot frees up."
    )


async def prompt_and_detokenizer(
    encoder: ChatEncoder, tokenizer, messages: list[Message]
) -> tuple[list[int], StreamingDetokenizer]:
    """The prompt ids for `messages` (continuing the last reply when the chat ends with one) and
    the detokenizer for what comes next, primed with that reply's last tokens when continuing.
    Tokenized off the event loop: a long history takes milliseconds."""
    continuing = continues_reply(messages)
    prompt_ids = await asyncio.to_thread(encoder.encode_chat, messages, continuing)
    detokenizer = StreamingDetokenizer(tokenizer)
    if continuing:
        detokenizer.prime(prompt_ids[-CONTINUATION_CONTEXT_TOKENS:])
    return prompt_ids, detokenizer


class LocalBackend:
    """Replies from an in-process `Engine`: ChatML ids in, detokenized text out.

    A prompt that ends with the assistant's message continues that reply (see `chatml`): the
    engine just sees a longer prompt, and the detokenizer first reads the reply's last tokens,
    so a continuation that starts with a new word keeps the space before it.
    """

    continues_replies = True
    completes_prompts = True  # `stream_prompt`: raw prompts, for the API's text completions

    @property
    def returns_logprobs(self) -> bool:
        """Whether its engine sends tokens' log-probabilities (the batched one does)."""
        return getattr(self.engine, "returns_logprobs", False)

    def __init__(self, engine: Engine, encoder: ChatEncoder, tokenizer) -> None:
        self.engine = engine
        self.encoder = encoder
        self.tokenizer = tokenizer
        # Compiles tools and response_format into grammars, for an engine that applies them
        # (engines/token_masks.py); None for one that cannot.
        vocab = getattr(engine, "grammar_vocab", None)
        self.grammars = (
            None if vocab is None else GrammarCompiler(tokenizer, vocab, [encoder.controls.im_end])
        )

    async def stream_reply(
        self,
        messages: list[Message],
        params: SamplingParams,
        notify: Notify | None = None,
        cache_scope: str | None = None,
    ) -> AsyncIterator[ReplyDelta]:
        prompt_ids, detokenizer = await prompt_and_detokenizer(self.encoder, self.tokenizer, messages)
        async for delta in self._stream(prompt_ids, detokenizer, params, notify, cache_scope):
            yield delta

    async def stream_prompt(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        notify: Notify | None = None,
        cache_scope: str | None = None,
    ) -> AsyncIterator[ReplyDelta]:
        """A raw prompt's continuation (no ChatML): the detokenizer reads the prompt's last
        tokens first, so that a first word keeps its space."""
        detokenizer = StreamingDetokenizer(self.tokenizer)
        detokenizer.prime(prompt_ids[-CONTINUATION_CONTEXT_TOKENS:])
        async for delta in self._stream(prompt_ids, detokenizer, params, notify, cache_scope):
            yield delta

    async def _stream(
        self,
        prompt_ids: list[int],
        detokenizer: StreamingDetokenizer,
        params: SamplingParams,
        notify: Notify | None,
        cache_scope: str | None,
    ) -> AsyncIterator[ReplyDelta]:
        handle = self.engine.submit(prompt_ids, params, cache_scope=cache_scope)
        try:
            if notify is not None and (place := self.engine.position(handle)):
                notify(queue_notice(place, self.engine.capacity))
            async for event in handle:
                if event.token is not None:
                    logprobs = ((event.token, event.logprobs),) if event.logprobs is not None else ()
                    yield ReplyDelta(detokenizer.add_token(event.token), tokens=1, logprobs=logprobs)
                elif event.finish_reason == "error":
                    raise EngineError(event.error or "generation failed")
                elif event.finish_reason in ("stop", "length"):
                    yield ReplyDelta(detokenizer.finalize(), finish_reason=event.finish_reason)
                elif event.finish_reason == "cancelled":
                    # Not by us: we cancel only once we stop reading. The engine cancels what it
                    # serves when it closes, as the server shuts down (Ctrl-C).
                    raise EngineError(SHUTTING_DOWN)
        finally:
            # Runs on stop, on a closed tab (gradio closes the generator) and on errors alike.
            handle.cancel()
