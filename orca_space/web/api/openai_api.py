"""The OpenAI chat-completions API on the page's own server: `POST /v1/chat/completions` and
`GET /v1/models`, so that the `openai` SDK, LangChain, Open WebUI or `InferenceClient` use the
Space as they are.

A request takes the chat's own path: `openai_schema.parse_request` checks it at the edge,
`to_conversation` translates it once into what `ChatService.prepare` takes (so the same text
checks, ChatML ids that no text can forge, history fitting and sampling limits apply), and
`Admission` applies the page's load limit and rate limit. Nothing of HTTP goes below this
module. Replies stream as server-sent events from the service's coalesced snapshots, at most 20
a second per reply as on the page: an event costs the server about 40 us of CPU on the event
loop (`bench/sse_cost.py`, 2-core machine), 0.12 s a second at 3,000 tokens/s if every token
were one. Stop strings are cut (`StopStringMatcher`) on every update before coalescing, so
the engine request ends at the token that completed one.

Closing the connection cancels the request in the engine, like the page's stop button: a
stream's generator is closed by starlette (and, as a backstop, after the response), and a
non-streamed answer is collected in a task that is cancelled when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask

from ...chat import MAX_HISTORY_MESSAGE_CHARS, MAX_HISTORY_MESSAGES, ChatService, PreparedChat, check_text
from ...engines.requests import EngineError
from ...history import PromptTooLong
from ...params import LIMITS
from ...replies import ReplyFinish, ReplyStats
from ..access import matching_key
from ..admission import Admission, Refused, request_client
from . import openai_schema as schema
from .openai_schema import ApiError, ChatCompletionRequest

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies: pass each event on


@dataclass(frozen=True)
class Conversation:
    """An OpenAI message list as the chat service takes it."""

    system: str
    history: list[dict[str, str]]
    message: str
    message_index: int  # where the new user message is in `messages`, for errors


@dataclass(frozen=True)
class Piece:
    """Part of an answer: new text, and on the last piece why it ended."""

    text: str
    stats: ReplyStats
    finish_reason: ReplyFinish | None = None


# -- translation ----------------------------------------------------------------------------------


def to_conversation(request: ChatCompletionRequest, service: ChatService) -> Conversation:
    """System messages first (several are joined), then the conversation, ending with a user
    message: this endpoint answers a user, it does not continue an assistant's message."""
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
    if messages[last].role != "user":
        raise ApiError("the last message must be a user message", param=f"messages[{last}].role")
    if last - leading > MAX_HISTORY_MESSAGES:
        raise ApiError(f"at most {MAX_HISTORY_MESSAGES + 1} messages besides system ones", param="messages")
    limits = service.limits
    for index in range(last):
        limit = limits.max_system_chars if index < leading else MAX_HISTORY_MESSAGE_CHARS
        _check(f"messages[{index}].content", messages[index].content, limit)
    _check(f"messages[{last}].content", messages[last].content, limits.max_message_chars, allow_empty=False)
    return Conversation(
        system="\n\n".join(m.content for m in messages[:leading] if m.content.strip()),
        history=[{"role": m.role, "content": m.content} for m in messages[leading:last]],
        message=messages[last].content,
        message_index=last,
    )


def _check(name: str, text: str, limit: int, allow_empty: bool = True) -> None:
    try:
        check_text(name, text, limit, allow_empty=allow_empty)
    except ValueError as exc:
        raise ApiError(str(exc), param=name) from None


def sampling(request: ChatCompletionRequest) -> dict[str, object]:
    """The sampling parameters the client set; the page's defaults fill in the rest."""
    raw = {
        name: value
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
        if (value := getattr(request, name)) is not None
    }
    if request.new_tokens is not None:
        raw["max_new_tokens"] = request.new_tokens[1]
    return raw


def prepare(service: ChatService, request: ChatCompletionRequest) -> PreparedChat:
    """Check and encode the request. With no token limit set, the reply may take all the room
    the prompt leaves (up to the page's maximum), as OpenAI's API does."""
    conversation = to_conversation(request, service)
    raw = sampling(request)
    raw.setdefault("max_new_tokens", 1)  # the prompt must leave room for one token at least
    limit_name = request.new_tokens[0] if request.new_tokens else "max_tokens"
    try:
        chat = service.prepare(
            conversation.message, conversation.history, conversation.system, raw, drop_unanswered=False
        )
    except PromptTooLong as exc:
        raise ApiError(str(exc), param="messages", code="context_length_exceeded") from None
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
    if request.new_tokens is None:
        room = min(int(LIMITS["max_new_tokens"].high), context - chat.prompt_tokens)
        chat = replace(chat, params=replace(chat.params, max_new_tokens=room))
    return chat


def in_api_words(message: str, param: str) -> str:
    """The chat service's "max_new_tokens (600) must be below the context length" under the name
    the client sent: "max_tokens (600) ..." (or max_completion_tokens)."""
    internal = "max_new_tokens"
    return param + message[len(internal) :] if message.startswith(internal) else message


def error_param(message: str, conversation: Conversation, limit_name: str) -> str:
    """The OpenAI field that a chat service error is about (its messages start with the name)."""
    if message.startswith("max_new_tokens"):
        return limit_name
    if message.startswith("message "):
        return f"messages[{conversation.message_index}].content"
    return "messages"


# -- answering ------------------------------------------------------------------------------------


async def answer_pieces(
    service: ChatService, chat: PreparedChat, stops: Sequence[str], client: str | None = None
) -> AsyncIterator[Piece]:
    """The answer's new text as it comes, at most one piece per `update_interval_s`; the last
    piece has the finish reason. `client` (who asks) scopes the engine's kept caches."""
    replies = service.stream(chat, cache_scope=client, stops=stops)
    seen = 0
    async with contextlib.aclosing(replies):
        async for reply in replies:
            text, seen = reply.text[seen:], len(reply.text)
            if reply.finished:
                yield Piece(text, reply.stats, reply.stats.finish_reason)
                return
            if text:
                yield Piece(text, reply.stats)
    raise EngineError("the reply ended without a finish reason; try again")


async def collect_answer(pieces: AsyncIterator[Piece]) -> tuple[str, Piece]:
    """The whole text and the last piece (`answer_pieces` always ends with one, or raises)."""
    texts, last = [], None
    async with contextlib.aclosing(pieces):
        async for last in pieces:
            texts.append(last.text)
    assert last is not None and last.finish_reason is not None
    return "".join(texts), last


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer_whole(request: Request, pieces: AsyncIterator[Piece]) -> tuple[str, Piece] | None:
    """The whole answer, or None if the client left first (and then the reply is cancelled)."""
    answer = asyncio.ensure_future(collect_answer(pieces))
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answer, gone):
            if not task.done():
                task.cancel()
        await asyncio.wait({answer, gone})
    return None if answer.cancelled() else answer.result()


def sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_events(pieces: AsyncIterator[Piece], model: str, include_usage: bool) -> AsyncIterator[str]:
    id_, created = schema.completion_id(), int(time.time())
    yield sse(
        schema.chunk(id_, model, created, {"role": "assistant", "content": ""}, with_usage=include_usage)
    )
    try:
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                if piece.text:
                    delta = {"content": piece.text}
                    yield sse(schema.chunk(id_, model, created, delta, with_usage=include_usage))
                if piece.finish_reason is not None:
                    yield sse(schema.chunk(id_, model, created, {}, piece.finish_reason, include_usage))
                    if include_usage:
                        yield sse(schema.usage_chunk(id_, model, created, piece.stats))
    except EngineError as exc:  # the status line is sent: report it the way OpenAI's SDK reads
        yield sse(ApiError(str(exc), status=500, kind="server_error").body())
    except Exception:
        log.exception("chat completion stream failed")
        yield sse(ApiError("internal error; see the server log", status=500, kind="server_error").body())
    yield "data: [DONE]\n\n"


# -- routes ---------------------------------------------------------------------------------------


def error_response(error: ApiError) -> JSONResponse:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def from_refusal(refused: Refused) -> ApiError:
    kind = "rate_limit_error" if refused.status == 429 else "service_unavailable"
    return ApiError(
        refused.message,
        status=refused.status,
        kind=kind,
        code=refused.kind,
        retry_after_s=refused.retry_after_s,
    )


@dataclass(frozen=True)
class OpenAIApi:
    admission: Admission
    model: str  # the id clients send and `/v1/models` lists: `--model` as given, as vLLM does
    access_keys: tuple[str, ...] = ()
    started: int = 0

    def routes(self) -> list[APIRoute]:
        return [
            APIRoute("/v1/models", self.models, methods=["GET"], name="openai_models"),
            APIRoute("/v1/chat/completions", self.chat_completions, methods=["POST"], name="openai_chat"),
            APIRoute("/v1/{rest:path}", self.not_found, methods=["GET", "POST"], name="openai_other"),
        ]

    async def models(self) -> JSONResponse:
        return JSONResponse(
            schema.model_list(self.model, self.started, self.admission.runtime.context_length)
        )

    async def not_found(self, rest: str) -> JSONResponse:
        error = ApiError(
            f"/v1/{rest:.100} is not served here: only POST /v1/chat/completions and GET /v1/models",
            status=404,
            kind="not_found_error",
        )
        return error_response(error)

    async def chat_completions(self, request: Request) -> Response:
        try:
            return await self._chat_completions(request)
        except ApiError as exc:
            return error_response(exc)
        except Refused as exc:
            return error_response(from_refusal(exc))
        except Exception:  # never a stack trace for the client
            log.exception("chat completion failed")
            return error_response(
                ApiError("internal error; see the server log", status=500, kind="server_error")
            )

    async def _chat_completions(self, request: Request) -> Response:
        body = parse_json(await request.body())
        completion = schema.parse_request(body)
        if completion.model is not None and completion.model != self.model:
            raise ApiError(
                f"model {completion.model!r:.100} is not served here; this Space serves {self.model!r}",
                param="model",
                code="model_not_found",
            )
        if ignored := completion.ignored_fields():
            log.info("chat completion: ignored unknown fields %s", ", ".join(f[:40] for f in ignored[:10]))
        client = self.client(request)
        service = self.admission.admit(client)
        if self.admission.runtime.zerogpu:
            carry_visitor_to_zerogpu(request)
        # Tokenizing a long conversation takes milliseconds: off the event loop that streams.
        chat = await asyncio.to_thread(prepare, service, completion)
        pieces = answer_pieces(service, chat, completion.stop or [], client)
        if completion.stream:
            events = sse_events(pieces, self.model, completion.include_usage)
            # Starlette cancels the stream when the client leaves; closing it after the response
            # as well makes sure the engine request ends even if it was parked at a `yield`.
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers=SSE_HEADERS,
                background=BackgroundTask(events.aclose),
            )
        try:
            whole = await answer_whole(request, pieces)
        except EngineError as exc:
            raise ApiError(str(exc), status=500, kind="server_error") from None
        if whole is None:
            return Response(status_code=499)  # nobody is there to read it
        text, last = whole
        return JSONResponse(
            schema.completion(schema.completion_id(), self.model, text, last.finish_reason, last.stats)
        )

    def client(self, request: Request) -> str:
        key_index = matching_key(request.headers.get("authorization"), self.access_keys)
        peer = request.client.host if request.client else None
        return request_client(self.admission.runtime, peer, request.headers.get("x-forwarded-for"), key_index)


def carry_visitor_to_zerogpu(request: Request) -> None:
    """On ZeroGPU each GPU call is charged to the visitor whose token (`X-IP-Token`, added by the
    Hub's proxy) `spaces` finds in gradio's request context. A /v1 call is no gradio event, so
    this request is put there for the rest of its task; without it the call would be charged to
    no visitor in particular (the Space's own limit), a way around the per-visitor quota."""
    import gradio as gr
    from gradio.context import LocalContext

    LocalContext.request.set(gr.Request(request=request))


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError("the request body is nested too deeply") from None
    except ValueError:  # Python reads no integer of more than 4,300 digits (sys.get_int_max_str_digits)
        raise ApiError(
            f"the request body holds an integer of more than {sys.get_int_max_str_digits():,} digits"
        ) from None
