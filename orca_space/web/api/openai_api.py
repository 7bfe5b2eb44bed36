"""The OpenAI-compatible API on the page's own server: `POST /v1/chat/completions`,
`POST /v1/completions` (a raw prompt), `GET /v1/models` and `/v1/models/{id}`, and `GET /health`
as vLLM and TGI serve it, so that the `openai` SDK, LangChain, Open WebUI or `InferenceClient`
use the Space as they are. Another method on these paths is a 405, another `/v1` path a 404.

A request takes the chat's own path: `openai_schema.parse_request` checks it at the edge,
`openai_requests.prepare` translates it once into what `ChatService.prepare` takes (so the same text
checks, ChatML ids that no text can forge, history fitting and sampling limits apply), and
`Admission` applies the page's load limit and /v1's own rate limit (before anything about the
request is logged: a refusal is one log line, after admission). Nothing of HTTP goes below this
module. Replies stream as server-sent events from the service's coalesced snapshots, at most 20
a second per reply as on the page: an event costs the server about 40 us of CPU on the event
loop (`bench/sse_cost.py`, 2-core machine), 0.12 s a second at 3,000 tokens/s if every token
were one. Stop strings are cut (`StopStringMatcher`) on every update before coalescing, so
the engine request ends at the token that completed one.

Tools and `response_format` (`output_rules.py`) add a tool section to the system message and
a grammar to the sampling parameters; the answer's calls come out as `tool_calls`
(`tool_calls.py`, streamed by `tool_stream.py`).

Closing the connection cancels the request in the engine, like the page's stop button: a
stream's generator is closed by starlette (and, as a backstop, after the response), and a
non-streamed answer is collected in a task that is cancelled when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask

from ...chat import ChatService, PreparedChat
from ...engines.requests import EngineError
from ..access import matching_key
from ..admission import Admission, Refused, request_client
from . import openai_schema as schema
from .openai_answers import (
    Answer,
    answer_pieces,
    answer_whole,
    choice_chat,
    logprob_writer,
    sse_events,
    whole_answer,
)
from .openai_completions import CompletionRequest
from .openai_requests import prepare, prepare_text
from .openai_schema import ApiError, SamplingRequest
from .output_rules import read_rules

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies: pass each event on


# -- routes ---------------------------------------------------------------------------------------


def error_response(error: ApiError) -> JSONResponse:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    if error.allow:
        headers["Allow"] = error.allow
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
            APIRoute("/health", self.health, methods=["GET"], name="health"),
            APIRoute("/v1/models", self.models, methods=["GET"], name="openai_models"),
            APIRoute("/v1/models/{model_id:path}", self.model_entry, methods=["GET"], name="openai_model"),
            APIRoute("/v1/chat/completions", self.chat_completions, methods=["POST"], name="openai_chat"),
            APIRoute("/v1/completions", self.text_completions, methods=["POST"], name="openai_completions"),
            *(wrong_method_route(path, "POST") for path in ("/v1/chat/completions", "/v1/completions")),
            *(
                wrong_method_route(path, "GET")
                for path in ("/v1/models", "/v1/models/{model_id:path}", "/health")
            ),
            APIRoute("/v1/{rest:path}", self.not_found, methods=["GET", "POST"], name="openai_other"),
        ]

    async def health(self) -> Response:
        """vLLM's and TGI's `GET /health`: 200 when replies can be served, 503 before (loading)
        or after (failed); `/healthz` says more."""
        try:
            self.admission.ready_service()
        except Refused as exc:
            return JSONResponse({"status": exc.kind, "message": exc.message}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self) -> JSONResponse:
        return JSONResponse(
            schema.model_list(self.model, self.started, self.admission.runtime.context_length)
        )

    async def model_entry(self, model_id: str) -> JSONResponse:
        """`GET /v1/models/{id}` (the SDK's `models.retrieve`); the id may hold slashes."""
        if model_id != self.model:
            error = ApiError(
                f"model {model_id!r:.100} is not served here; this Space serves {self.model!r}",
                status=404,
                kind="not_found_error",
                code="model_not_found",
            )
            return error_response(error)
        entries = schema.model_list(self.model, self.started, self.admission.runtime.context_length)
        return JSONResponse(entries["data"][0])

    async def not_found(self, rest: str) -> JSONResponse:
        error = ApiError(
            f"/v1/{rest:.100} is not served here: only POST /v1/chat/completions, POST /v1/completions "
            "and GET /v1/models",
            status=404,
            kind="not_found_error",
        )
        return error_response(error)

    async def chat_completions(self, request: Request) -> Response:
        return await self.answer(request, schema.ChatCompletionRequest, self._chat)

    async def text_completions(self, request: Request) -> Response:
        return await self.answer(request, CompletionRequest, self._text)

    async def answer(self, request: Request, kind: type, respond) -> Response:
        """Parse, admit, then answer. A request is admitted (counted by the rate limit) before
        anything about it is logged: a refusal (400) or ignored fields are one log line each,
        after admission, so a flood of bad requests is bounded by the rate limit, not by the log."""
        client = self.client(request)
        try:
            try:
                parsed, problem = schema.parse_request(parse_json(await request.body()), kind), None
            except ApiError as exc:
                parsed, problem = None, exc
            service = self.admission.admit(client)
            if problem is not None:
                raise problem
            if ignored := parsed.ignored_fields():
                # repr: a field's name is the caller's text, and must not start a log line of its own
                log.info(
                    "%s: ignored fields %s", request.url.path, ", ".join(repr(f[:40]) for f in ignored[:10])
                )
            self.check_model(parsed)
            if self.admission.runtime.zerogpu:
                carry_visitor_to_zerogpu(request)
            return await respond(request, service, parsed, client)
        except ApiError as exc:
            log.info("%s refused (%s, %r): %.200r", request.url.path, exc.status, exc.param, exc.message)
            return error_response(exc)
        except Refused as exc:  # not logged: these are what a flood gets
            return error_response(from_refusal(exc))
        except Exception:  # never a stack trace for the client
            log.exception("%s failed", request.url.path)
            return error_response(
                ApiError("internal error; see the server log", status=500, kind="server_error")
            )

    def check_model(self, parsed: SamplingRequest) -> None:
        if parsed.model is not None and parsed.model != self.model:
            raise ApiError(
                f"model {parsed.model!r:.100} is not served here; this Space serves {self.model!r}",
                param="model",
                code="model_not_found",
            )

    async def _chat(self, request: Request, service: ChatService, parsed, client: str) -> Response:
        rules = read_rules(
            parsed.tools, parsed.tool_choice, parsed.parallel_tool_calls, parsed.response_format
        )
        # Tokenizing a long conversation takes milliseconds: off the event loop that streams.
        chat = await asyncio.to_thread(prepare, service, parsed, rules)
        return await self.respond(request, service, parsed, chat, client, schema.CHAT, rules.calls_possible)

    async def _text(self, request: Request, service: ChatService, parsed, client: str) -> Response:
        chat = await asyncio.to_thread(prepare_text, service, parsed)
        return await self.respond(request, service, parsed, chat, client, schema.TEXT)

    async def respond(
        self, request, service, parsed: SamplingRequest, chat: PreparedChat, client: str, shape, calls=False
    ) -> Response:
        choices = [
            answer_pieces(service, choice_chat(chat, index), parsed.stop or [], client)
            for index in range(parsed.choices)
        ]
        answer = Answer(shape, self.model, choices, logprob_writer(shape, service, parsed), calls)
        if parsed.stream:
            events = sse_events(answer, parsed.include_usage)
            # Starlette cancels the stream when the client leaves; closing it after the response
            # as well makes sure the engine requests end even if one was parked at a `yield`.
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers=SSE_HEADERS,
                background=BackgroundTask(events.aclose),
            )
        try:
            body = await answer_whole(request, whole_answer(answer))
        except EngineError as exc:
            raise ApiError(str(exc), status=500, kind="server_error") from None
        if body is None:
            return Response(status_code=499)  # nobody is there to read it
        return JSONResponse(body)

    def client(self, request: Request) -> str:
        key_index = matching_key(request.headers.get("authorization"), self.access_keys)
        peer = request.client.host if request.client else None
        return request_client(self.admission.runtime, peer, request.headers.get("x-forwarded-for"), key_index)


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def wrong_method_route(path: str, allowed: str) -> APIRoute:
    """A 405 in OpenAI's shape, with `Allow`, for every other method on a served path."""

    async def refuse(request: Request) -> JSONResponse:
        error = ApiError(
            f"{request.method} is not allowed on {request.url.path}; use {allowed}",
            status=405,
            code="method_not_allowed",
        )
        error.allow = allowed
        return error_response(error)

    others = [method for method in METHODS if method != allowed]
    return APIRoute(path, refuse, methods=others, name=f"wrong_method {path}")


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
