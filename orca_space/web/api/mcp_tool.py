"""One MCP tool on gradio's MCP server (`--mcp`): ask MistralOrca a question, get the whole answer.

gradio makes an MCP tool of every public API endpoint, the page's `/chat` included, and has no
per-endpoint switch for MCP. So the tool is registered as an API endpoint of its own (`/ask`,
through `gr.api`, no extra components on the page), and once gradio has built its MCP server
(at app start-up, before the first request) `expose_only_the_tool` takes every other endpoint
out of its tool table, which is what gradio both lists and calls from.

The endpoint runs outside gradio's queue: gradio's MCP server calls a queued endpoint back over
HTTP through `gradio_client`, which a login (`--auth`) would refuse, while an unqueued one it
calls in process. The tool passes the same checks as any chat (`Admission`: load and rate
limits; `ChatService.prepare`: text, ChatML, sampling limits), and `/gradio_api/mcp` is guarded
by the access keys (`access.AccessGate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator, Sequence

import gradio as gr

from ...chat import DEFAULT_SYSTEM_MESSAGE
from ...engines.requests import EngineError
from ...params import LIMITS, max_new_tokens_limit
from ..access import matching_key
from ..admission import Admission, Refused, request_client
from ..refusals import refusal

TOOL_API_NAME = "ask"


def add_mcp_tool(demo: gr.Blocks, admission: Admission, access_keys: Sequence[str]) -> None:
    """Register the tool's endpoint on the page's Blocks (call before launch)."""
    default_tokens = int(max_new_tokens_limit(admission.runtime.context_length).default)  # the page's

    async def ask_mistral_orca(
        message: str,
        system_message: str = DEFAULT_SYSTEM_MESSAGE,
        max_new_tokens: int = default_tokens,
        temperature: float = LIMITS["temperature"].default,
        request: gr.Request = None,
    ) -> str:
        """Ask MistralOrca (Mistral-7B-OpenOrca) one question and get its whole answer as text.

        Args:
            message: the question or instruction, as a user would type it
            system_message: how the model should behave; empty for none
            max_new_tokens: the longest answer, in tokens (1 to 4096, and less than the context)
            temperature: 0 for the most likely answer (greedy), up to 2 for more varied ones
        """
        try:
            client = tool_client(admission, request, access_keys)
            service = admission.admit(client)
            raw = {"max_new_tokens": max_new_tokens, "temperature": temperature}
            chat = await asyncio.to_thread(service.prepare, message, [], system_message, raw)
            text = ""
            async with contextlib.aclosing(service.stream(chat, cache_scope=client)) as replies:
                async for reply in replies:
                    text = reply.text
            return text
        except (ValueError, Refused, EngineError) as exc:
            raise refusal(str(exc)) from None

    with demo:  # re-entering the built page adds the endpoint to it
        gr.api(ask_mistral_orca, api_name=TOOL_API_NAME, queue=False)


def tool_client(admission: Admission, request: gr.Request | None, access_keys: Sequence[str]) -> str:
    if request is None:
        return "unknown"
    headers = request.headers
    key_index = matching_key(headers.get("authorization"), access_keys)
    peer = request.client.host if request.client else None
    return request_client(admission.runtime, peer, headers.get("x-forwarded-for"), key_index)


def expose_only_the_tool(demo: gr.Blocks):
    """A lifespan for gradio's app: leave only the tool in gradio's MCP tool table."""

    @contextlib.asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        server = demo.mcp_server_obj
        if server is not None:
            server.tool_to_endpoint = {
                tool: endpoint
                for tool, endpoint in server.tool_to_endpoint.items()
                if endpoint == f"/{TOOL_API_NAME}"
            }
        yield

    return lifespan


def quiet_state_warning() -> None:
    """gradio warns that `/chat` has a gr.State input (its history) before the table is
    trimmed; that endpoint is never a tool here."""
    warnings.filterwarnings("ignore", message="This MCP server includes a tool that has a gr.State input")
