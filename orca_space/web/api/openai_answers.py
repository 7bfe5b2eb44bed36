"""Answering an OpenAI request: its choices' pieces from the chat service, written whole or as
server-sent events, in the shape of chat or text completions (`openai_schema.Shape`).

Each choice (`n` of them) is one request in the engine; `merged` streams their pieces as they
come. Closing a stream (the client left) closes every choice's, which cancels their requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fastapi import Request

from ...chat import ChatService, PreparedChat
from ...engines.requests import EngineError
from ...replies import ReplyFinish, ReplyStats
from . import openai_schema as schema
from . import tool_calls, tool_stream
from .openai_logprobs import LogprobWriter
from .openai_schema import ApiError, SamplingRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Piece:
    """Part of an answer: new text, and on the last piece why it ended."""

    text: str
    stats: ReplyStats
    finish_reason: ReplyFinish | None = None
    logprobs: tuple = ()  # (token id, TokenLogprobs) of the tokens since the last piece, if asked


async def answer_pieces(
    service: ChatService, chat: PreparedChat, stops: Sequence[str], client: str | None = None
) -> AsyncIterator[Piece]:
    """The answer's new text as it comes, at most one piece per `update_interval_s`; the last
    piece has the finish reason. `client` (who asks) scopes the engine's kept caches."""
    replies = service.stream(chat, cache_scope=client, stops=stops)
    seen = counted = 0
    async with contextlib.aclosing(replies):
        async for reply in replies:
            text, seen = reply.text[seen:], len(reply.text)
            logprobs, counted = reply.logprobs[counted:], len(reply.logprobs)
            if reply.finished:
                yield Piece(text, reply.stats, reply.stats.finish_reason, logprobs)
                return
            if text or logprobs:
                yield Piece(text, reply.stats, logprobs=logprobs)
    raise EngineError("the reply ended without a finish reason; try again")


async def collect_answer(pieces: AsyncIterator[Piece]) -> Piece:
    """The whole answer as one piece (`answer_pieces` always ends with a last one, or raises)."""
    texts, logprobs, last = [], [], None
    async with contextlib.aclosing(pieces):
        async for last in pieces:
            texts.append(last.text)
            logprobs.extend(last.logprobs)
    assert last is not None and last.finish_reason is not None
    return replace(last, text="".join(texts), logprobs=tuple(logprobs))


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer_whole(request: Request, answers: Awaitable[T]) -> T | None:
    """The whole answer, or None if the client left first (and then the reply is cancelled)."""
    answer = asyncio.ensure_future(answers)
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answer, gone):
            if not task.done():
                task.cancel()
        await asyncio.wait({answer, gone})
    return None if answer.cancelled() else answer.result()


async def merged(sources: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, each with its stream's index (`n` choices).
    Closing this closes them all; the first error ends it."""
    queue: asyncio.Queue[tuple[int, object, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, source: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(source):
                async for item in source:
                    await queue.put((index, item, None))
        except Exception as exc:
            await queue.put((index, None, exc))
            return
        await queue.put((index, _ENDED, None))

    tasks = [asyncio.ensure_future(pump(index, source)) for index, source in enumerate(sources)]
    try:
        running = len(tasks)
        while running:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _ENDED:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_ENDED = object()


def sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass(frozen=True)
class Answer:
    """What one request's answer is written from: its choices' pieces, and how to write them."""

    shape: schema.Shape
    model: str
    choices: list[AsyncIterator[Piece]]
    logprobs: LogprobWriter | None = None
    calls: bool = False  # tools were offered: a reply's calls are sent as `tool_calls` (chat only)


async def sse_events(answer: Answer, include_usage: bool) -> AsyncIterator[str]:
    shape, model = answer.shape, answer.model
    id_, created = shape.new_id(), int(time.time())
    usage_field = {"usage": None} if include_usage else {}

    def event(choices: list[dict]) -> str:
        return sse(schema.envelope(shape, id_, model, created, choices, True, **usage_field))

    openings = [c for i in range(len(answer.choices)) if (c := shape.opening(i)) is not None]
    if openings:
        yield event(openings)
    last: dict[int, ReplyStats] = {}
    splitters = [tool_stream.StreamingSplitter() for _ in answer.choices] if answer.calls else None
    try:
        async with contextlib.aclosing(merged(answer.choices)) as pieces:
            async for index, piece in pieces:
                logprobs = answer.logprobs.write(piece.logprobs) if answer.logprobs else None
                if splitters is not None:
                    for choice in call_chunks(index, splitters[index], piece, logprobs):
                        yield event([choice])
                elif piece.text or logprobs or piece.finish_reason is not None:
                    yield event(
                        [shape.choice(index, piece.text, piece.finish_reason, logprobs, streamed=True)]
                    )
                if piece.finish_reason is not None:
                    last[index] = piece.stats
        if include_usage:
            stats = [last[i] for i in sorted(last)]
            yield sse(schema.envelope(shape, id_, model, created, [], True, usage=schema.usage(stats)))
    except EngineError as exc:  # the status line is sent: report it the way OpenAI's SDK reads
        yield sse(ApiError(str(exc), status=500, kind="server_error").body())
    except Exception:
        log.exception("completion stream failed")
        yield sse(ApiError("internal error; see the server log", status=500, kind="server_error").body())
    yield "data: [DONE]\n\n"


async def whole_answer(answer: Answer) -> dict[str, Any]:
    """Every choice in full, with the usage of all of them."""
    try:
        async with asyncio.TaskGroup() as group:  # one choice failing cancels the others
            tasks = [group.create_task(collect_answer(pieces)) for pieces in answer.choices]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    results = [task.result() for task in tasks]
    choices = [
        answer.shape.choice(
            index,
            whole.text,
            whole.finish_reason,
            answer.logprobs.write(whole.logprobs) if answer.logprobs else None,
            streamed=False,
        )
        for index, whole in enumerate(results)
    ]
    if answer.calls:
        choices = [tool_calls.with_calls(choice, whole.text) for choice, whole in zip(choices, results)]
    usage = schema.usage([whole.stats for whole in results])
    return schema.envelope(
        answer.shape, answer.shape.new_id(), answer.model, int(time.time()), choices, False, usage=usage
    )


def call_chunks(
    index: int, splitter: tool_stream.StreamingSplitter, piece: Piece, logprobs: Any
) -> list[dict[str, Any]]:
    """A chat choice's streamed chunks for `piece` when tools were offered: its content, call
    heads and argument fragments as OpenAI's deltas, then the finish reason ("tool_calls" after
    calls). The piece's log-probabilities ride on its first chunk."""
    finished = piece.finish_reason is not None
    deltas = tool_stream.text_deltas(splitter, piece.text, finished)
    if logprobs and not deltas:
        deltas = [{}]
    chunks = [
        {"index": index, "delta": delta, "logprobs": logprobs if i == 0 else None, "finish_reason": None}
        for i, delta in enumerate(deltas)
    ]
    if finished:
        reason = tool_calls.finish_reason(piece.finish_reason, splitter.made_calls)
        chunks.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": reason})
    return chunks


def logprob_writer(
    shape: schema.Shape, service: ChatService, request: SamplingRequest
) -> LogprobWriter | None:
    """How the answer writes log-probabilities, when the request asks for them."""
    if request.logprob_alternatives is None:
        return None
    backend = service.backend
    if not getattr(backend, "returns_logprobs", False):
        raise ApiError("log-probabilities are not returned by this Space's engine", param="logprobs")
    return LogprobWriter(shape, backend.tokenizer)


def choice_chat(chat: PreparedChat, index: int) -> PreparedChat:
    """Choice `index` of `n`: the same prompt; a seed given makes each choice reproducible and
    different (choice 0 keeps it, so n = 1 samples as before)."""
    seed = chat.params.seed
    if index == 0 or seed is None:
        return chat
    return replace(chat, params=replace(chat.params, seed=seed ^ index))
