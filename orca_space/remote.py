"""Replies streamed from an OpenAI-compatible chat-completions server.

TGI, vLLM, `transformers serve` and Hugging Face Inference Endpoints all speak
`POST /v1/chat/completions` with server-sent events. This is the only module that imports
huggingface_hub's InferenceClient, so a version bump of huggingface_hub is a change here.

Three things about `AsyncInferenceClient` (huggingface_hub 2.4) shape this module:
- It keeps every stream's HTTP response in its exit stack until `client.close()`, so a shared
  client would pile up the responses of finished streams. Each reply gets its own client, held
  for the whole stream (a collected client ends the stream) and closed with the stream in
  `finally`. That closes the connection, and the server stops generating: on a stop, gradio
  cancels us inside the network read; on a closed tab it closes the generator at a `yield`,
  and then only our `finally` closes the connection before garbage collection would.
- With no api key it sends the token of `hf auth login` to whatever URL it talks to; we send
  exactly the key we were given, or none.
- With `HF_HUB_OFFLINE=1` it refuses every request, even to a server on loopback.

Sampling parameters: the OpenAI schema has temperature, top_p, seed and max_tokens; top_k and
repetition_penalty go as extra fields, which vLLM honours and TGI ignores. `transformers serve`
rejects unknown fields (HTTP 422) and, worse, ignores temperature unless the model's own
generation config samples (Mistral-7B-OpenOrca's does not). When it rejects our extras we
switch, once per backend, to its own `generation_config` field, which carries do_sample,
temperature, top_p, top_k and repetition_penalty. Temperature 0 means greedy everywhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import (
    HfHubHTTPError,
    InferenceTimeoutError,
    OfflineModeIsEnabled,
    OverloadedError,
    TextGenerationError,
)

from .chat import Notify
from .engines.requests import EngineError, EngineStats
from .history import Message
from .loading import ModelLoadError
from .params import SamplingParams
from .replies import ReplyDelta

log = logging.getLogger(__name__)

OVERLOADED_STATUSES = (429, 503)
DETAIL_CHARS = 300  # of a server's error message, shown to the user
# The fields `transformers serve` answers 422 for; seeing one means "speak its dialect".
EXTRA_FIELDS = ("top_k", "repetition_penalty")
DEFAULT_CAPACITY = 16


class RemoteBackend:
    """A `ChatBackend` (and, for /healthz, an engine) backed by a remote server."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise ModelLoadError(f"--endpoint must be an http:// or https:// URL, got {endpoint!r}.")
        if offline_mode():
            raise ModelLoadError(offline_message(endpoint))
        self.endpoint = endpoint
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.capacity = capacity
        self._active = 0
        self._generation_config_dialect = False  # learnt from the server's first 422

    # -- engine side, for /healthz --
    def stats(self) -> EngineStats:
        # The server's own queue is out of sight; what we know is what we have in flight. Its
        # prefix cache too: vLLM and TGI keep and reuse prompts themselves (see the README).
        return EngineStats(
            alive=True, active=self._active, queued=0, capacity=self.capacity, prefix_cache="server"
        )

    def close(self) -> None:
        """Nothing to release: each reply's client is closed when its stream ends."""

    # -- chat side --
    async def stream_reply(
        self,
        messages: list[Message],
        params: SamplingParams,
        notify: Notify | None = None,
        cache_scope: str | None = None,
    ) -> AsyncIterator[ReplyDelta]:
        """The reply's pieces; raises `EngineError` with a sentence for the user.
        (`notify` is unused: the server queues out of our sight; `cache_scope` too: the server
        decides what it reuses.)"""
        client = self._new_client()  # referenced until `finally`: see the module docstring
        stream = None
        self._active += 1
        try:
            stream = await self._open_stream(client, messages, params)
            finish = None
            async for chunk in stream:
                for choice in chunk.choices or ():  # usage-only chunks have no choices
                    finish = finish or choice.finish_reason
                    if choice.delta is not None and choice.delta.content:
                        # These servers send a chunk per token (a count, not a measure).
                        yield ReplyDelta(choice.delta.content, tokens=1)
            if finish is None:
                raise EngineError(
                    f"The model server at {self.endpoint} stopped before the reply was finished; try again."
                )
            yield ReplyDelta(finish_reason="length" if finish == "length" else "stop")
        except EngineError:
            raise
        except Exception as exc:  # never a stack trace for the user: one sentence instead
            log.warning("remote request to %s failed: %s: %s", self.endpoint, type(exc).__name__, exc)
            raise EngineError(explain_failure(exc, self.endpoint, self.timeout)) from None
        finally:
            self._active -= 1
            # Runs on stop and on a closed tab too (GeneratorExit / CancelledError).
            await close_stream(stream, client)

    async def _open_stream(
        self, client: AsyncInferenceClient, messages: list[Message], params: SamplingParams
    ) -> AsyncIterator[Any]:
        """Start the stream; on a 422 naming our extra fields, switch dialect and retry once."""
        if not self._generation_config_dialect:
            try:
                return await self._request(client, messages, openai_arguments(params))
            except HfHubHTTPError as exc:
                if not rejects_extra_fields(exc):
                    raise
                log.info(
                    "%s rejects top_k/repetition_penalty; sending a generation_config instead", self.endpoint
                )
                self._generation_config_dialect = True
        return await self._request(client, messages, generation_config_arguments(params))

    async def _request(
        self, client: AsyncInferenceClient, messages: list[Message], arguments: dict[str, Any]
    ) -> AsyncIterator[Any]:
        return await client.chat_completion(
            messages=[dict(message) for message in messages], model=self.model, stream=True, **arguments
        )

    def _new_client(self) -> AsyncInferenceClient:
        # A `None` header is dropped from the request, and it keeps InferenceClient from
        # filling in the locally saved Hugging Face token for a server we did not give it to.
        headers = {} if self.api_key else {"authorization": None}
        return AsyncInferenceClient(
            base_url=self.endpoint, api_key=self.api_key, timeout=self.timeout, headers=headers
        )


async def close_stream(stream: AsyncIterator[Any] | None, client: AsyncInferenceClient) -> None:
    """Close the stream, then the client (which closes the connection); never raise."""
    try:
        if stream is not None:
            await stream.aclose()
    except Exception as exc:  # the connection may already be gone; closing must not mask why
        log.debug("closing the stream failed: %s", exc)
    finally:
        try:
            await client.close()
        except Exception as exc:
            log.debug("closing the client failed: %s", exc)


def openai_arguments(params: SamplingParams) -> dict[str, Any]:
    """OpenAI fields, plus top_k and repetition_penalty as extras (vLLM reads them)."""
    extra: dict[str, Any] = {"repetition_penalty": params.repetition_penalty}
    arguments: dict[str, Any] = {"max_tokens": params.max_new_tokens, "seed": params.seed}
    if params.greedy:
        arguments["temperature"] = 0.0  # greedy for vLLM and current TGI alike
    else:
        arguments.update(temperature=params.temperature, top_p=params.top_p)
        if params.top_k > 0:  # omitted = off; servers disagree on whether 0 or -1 means off
            extra["top_k"] = params.top_k
        if params.min_p:
            extra["min_p"] = params.min_p
    # The API's settings, sent only when set: a server that lacks them then never sees them.
    for name in ("presence_penalty", "frequency_penalty"):
        if value := getattr(params, name):
            arguments[name] = value
    if params.ignore_eos:
        extra["ignore_eos"] = True
    return {**arguments, "extra_body": extra}


def generation_config_arguments(params: SamplingParams) -> dict[str, Any]:
    """`transformers serve`'s dialect: sampling settings in a `generation_config` JSON string.

    The server fills what we leave out (EOS, pad) from the model's generation config; top_k is
    always given because transformers' own default (50) would apply otherwise.
    """
    config: dict[str, Any] = {"repetition_penalty": params.repetition_penalty}
    if params.greedy:
        config["do_sample"] = False
    else:
        config.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    return {
        "max_tokens": params.max_new_tokens,
        "seed": params.seed,
        "extra_body": {"generation_config": json.dumps(config)},
    }


def rejects_extra_fields(exc: HfHubHTTPError) -> bool:
    response = exc.response
    return (
        response is not None
        and response.status_code == 422
        and any(field in response_text(response) for field in EXTRA_FIELDS)
    )


def explain_failure(exc: Exception, endpoint: str, timeout: float) -> str:
    """One plain sentence saying what went wrong with the remote server and what to do."""
    server = f"The model server at {endpoint}"
    if isinstance(exc, OfflineModeIsEnabled):
        return offline_message(endpoint)
    if isinstance(exc, (InferenceTimeoutError, httpx2.TimeoutException)):
        return f"{server} did not answer within {timeout:g} seconds; try again in a moment."
    if isinstance(exc, httpx2.ConnectError):
        return f"{server} is unreachable; check that it is running, or try again in a moment."
    if isinstance(exc, OverloadedError):
        return f"{server} is overloaded; try again in a moment."
    if isinstance(exc, TextGenerationError):  # an error event in the middle of the stream
        return f"{server} failed while generating: {str(exc)[:DETAIL_CHARS]}"
    if isinstance(exc, httpx2.TransportError):  # reset, closed mid-stream, protocol errors
        return f"The connection to the model server at {endpoint} broke before the reply was finished."
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return explain_status(exc.response.status_code, response_detail(exc.response), server)
    return f"The request to the model server at {endpoint} failed ({type(exc).__name__})."


def explain_status(status: int, detail: str, server: str) -> str:
    said = f": {detail}." if detail else "."
    if status in OVERLOADED_STATUSES:
        return f"{server} is overloaded (HTTP {status}); try again in a moment."
    if status in (401, 403):
        return f"{server} refused the API key (HTTP {status}); check --api-key or HF_TOKEN."
    if status == 404:  # a wrong path, or (vLLM) a model name it does not serve
        return f"{server} answered HTTP 404{said} Check --endpoint (it usually ends in /v1) and --model."
    if 400 <= status < 500:
        return f"{server} rejected the request (HTTP {status}){said}"
    return f"{server} failed (HTTP {status}){said}"


def response_detail(response: httpx2.Response) -> str:
    """The server's own error message, if its body says one (FastAPI, TGI and vLLM shapes)."""
    text = response_text(response)
    try:
        body = json.loads(text)
    except ValueError:
        body = "" if text.lstrip().startswith("<") else text  # a proxy's HTML error page says nothing useful
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            value = body.get(key)
            if isinstance(value, dict):  # vLLM/OpenAI: {"error": {"message": ...}}
                value = value.get("message")
            if isinstance(value, str) and value:
                body = value
                break
    # Trailing periods go: the sentence around the detail ends with its own.
    return body.strip().rstrip(".")[:DETAIL_CHARS] if isinstance(body, str) else ""


def response_text(response: httpx2.Response) -> str:
    # huggingface_hub reads the body of a failed streaming response only when it is short;
    # an unread body raises here, and then there is simply no detail.
    try:
        return response.text
    except httpx2.ResponseNotRead:
        return ""


def offline_mode() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def offline_message(endpoint: str) -> str:
    return (
        f"HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, and then huggingface_hub refuses every "
        f"request, even to the model server at {endpoint}. Unset it to use --backend remote; "
        "with --model pointing at a local directory nothing is downloaded either way."
    )
