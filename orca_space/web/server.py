"""Serving the page: the queue, `/healthz`, the OpenAI-compatible API and MCP, and launch
settings that are safe on a public link."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import gradio as gr
from fastapi.responses import PlainTextResponse, Response
from fastapi.routing import APIRoute
from starlette.middleware import Middleware

from ..listening import bind_failure
from ..metrics import CONTENT_TYPE
from ..runtime import ChatRuntime
from ..settings import Settings
from .access import AccessGate
from .admission import Admission
from .announce import announce_start
from .api.mcp_tool import add_mcp_tool, expose_only_the_tool, quiet_state_warning
from .api.openai_api import OpenAIApi
from .json_numbers import OverlongIntegers
from .media_policy import SameOriginMedia
from .own_origin_cors import install_own_origin_cors
from .page.assets import CSS, LIVE_PAGE_HEAD, page_theme
from .page.link_page import LINK_PAGE_CSS
from .page.saved_chats import SIDEBAR_CSS, SIDEBAR_HEAD
from .page.slider_notes import SLIDER_NOTES_CSS, SLIDER_NOTES_HEAD
from .remote_fetch_guard import RemoteFetchGuard, refuse_remote_downloads
from .session_bounds import MAX_SESSIONS, bound_sessions

log = logging.getLogger(__name__)
# Bigger request bodies are refused before anything parses them. Every chat turn the page sends
# the whole conversation (the chatbot -> history sync), and gradio keeps what it receives in the
# session's state, so without a cap one caller could park gigabytes in memory.
MAX_BODY_BYTES = 4 << 20
SHARE_WITHOUT_AUTH_WARNING = (
    "WARNING: --share makes a public link that anyone who has it can use (and spend your GPU on). "
    "Add --auth user:password to require a login."
)


def health(runtime: ChatRuntime) -> dict[str, Any]:
    """What `GET /healthz` answers: overall status and the engine's load."""
    status = runtime.status
    stats = runtime.engine_stats()
    if status.failed or (stats is not None and not stats.alive):
        state = "error"
    elif not status.ready:
        state = "loading"
    else:
        state = "ok"
    body: dict[str, Any] = {
        "status": state,
        "phase": status.phase,
        "message": stats.failure if stats is not None and stats.failure else status.message,
        "model": runtime.model_name,
        "active": stats.active if stats else 0,
        "queued": stats.queued if stats else 0,
        "capacity": stats.capacity if stats else 0,
        "non_finite_replies": stats.non_finite_replies if stats else 0,
        "prefix_cache": prefix_cache_fields(stats),
    }
    body.update(engine_fields(runtime))
    return body


def prefix_cache_fields(stats) -> dict[str, Any]:
    """How much of the prompts the engine took from kept KV caches (engines/prefix_cache.py):
    `mode` private, shared or off; none for an engine that keeps nothing (the reference rung,
    ZeroGPU); server when a remote server decides. The share is in whole percent since start:
    /healthz answers anyone even where access keys guard /metrics, and token counts read every
    second would tell how long the prompts of whoever else is chatting are."""
    if stats is None:
        return {"mode": None}
    share = stats.reused_share
    return {
        "mode": stats.prefix_cache,
        "kept_slots": stats.kept_caches,
        "reused_share": None if share is None else round(share, 2),
    }


def engine_fields(runtime: ChatRuntime) -> dict[str, Any]:
    """Which engine serves, and why not a faster one: `fallback` lists each rung left, with why."""
    choice = runtime.engine_choice
    if choice is None:
        return {"engine": "remote" if runtime.engine is not None else None, "fallback": []}
    return {
        "engine": choice.engine,
        "fallback": [{"engine": f.rung, "reason": f.reason} for f in choice.fallback],
        "attention": getattr(runtime.engine, "attention", None),
        "self_check": choice.self_check.summary() if choice.self_check else None,
    }


class BodySizeLimit:
    """ASGI middleware: answer 413 to a request body over `max_bytes`, declared or streamed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a chunked body without a length: end it here
                    return {"type": "http.disconnect"}
            return message

        return await self.app(scope, counted_receive, send)

    async def _too_large(self, scope, receive, send):
        response = PlainTextResponse(f"request body over {self.max_bytes:,} bytes", status_code=413)
        await response(scope, receive, send)


def public_link_warning(settings: Settings) -> str | None:
    return SHARE_WITHOUT_AUTH_WARNING if settings.share and settings.auth is None else None


def health_route(runtime: ChatRuntime) -> APIRoute:
    async def healthz() -> dict[str, Any]:
        return health(runtime)

    return APIRoute("/healthz", healthz, methods=["GET"], name="healthz")


def metrics_route(runtime: ChatRuntime) -> APIRoute:
    """`GET /metrics` in Prometheus' text format (see orca_space/metrics.py); guarded like /v1."""
    metrics = runtime.metrics

    async def serve_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return APIRoute("/metrics", serve_metrics, methods=["GET"], name="metrics")


def launch(demo: gr.Blocks, runtime: ChatRuntime, settings: Settings, **overrides: Any):
    """Queue and launch; `overrides` lets tests pass `prevent_thread_lock=True` and the like."""
    if warning := public_link_warning(settings):
        log.warning(warning)
        print(warning, flush=True)
    # Waiting chats beyond max_queue get an immediate "queue is full" from gradio, not a hang.
    demo.queue(default_concurrency_limit=runtime.concurrency, max_size=settings.max_queue)
    admission = Admission(runtime, settings.max_queue)
    api_admission = Admission(runtime, settings.max_queue, api=True)  # /v1's own rate limit
    api = OpenAIApi(api_admission, settings.model, settings.access_key, started=int(time.time()))
    app_kwargs: dict[str, Any] = {
        "routes": [health_route(runtime), metrics_route(runtime), *api.routes()],
        "middleware": [
            Middleware(RemoteFetchGuard),  # no fetching of URLs for clients: see remote_fetch_guard.py
            # No picture in a message calls home, no form posts elsewhere: see media_policy.py.
            Middleware(SameOriginMedia, frame_ancestors=settings.frame_ancestors),
            Middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES),
            Middleware(OverlongIntegers),  # a named 400, not a parser's 500: see json_numbers.py
            # /v1 and gradio's MCP mount are not behind gradio's login: see access.py.
            Middleware(AccessGate, keys=settings.access_key, login_required=settings.auth is not None),
        ],
    }
    if settings.auth is not None:
        # FastAPI's own schema of every route is not behind gradio's login (gradio's
        # /gradio_api/openapi.json is); gradio already turns off /docs and /redoc.
        app_kwargs["openapi_url"] = None
    refuse_remote_downloads()
    # What gradio keeps per session, and for how many: see session_bounds.py.
    bound_sessions(demo, runtime, settings.session_memory_mb << 20)
    install_own_origin_cors()  # credentialed CORS for the app's own origin only: see own_origin_cors.py
    distrust_forwarded_headers(settings.trusted_proxy_hops)
    if settings.mcp:
        add_mcp_tool(demo, admission, settings.access_key)
        app_kwargs["lifespan"] = expose_only_the_tool(demo)
        quiet_state_warning()
    options: dict[str, Any] = dict(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=settings.auth,
        auth_message="Log in to chat with Mistral-7B-OpenOrca.",
        app_kwargs=app_kwargs,
        mcp_server=settings.mcp,  # explicit: GRADIO_MCP_SERVER is read by settings, not by gradio
        enable_monitoring=False,  # no /monitoring dashboard on a public link
        # gradio's run history downloads the remote files in a signed-in user's runs and relays
        # files from Hugging Face buckets; the app has no use for it.
        run_history=False,
        # Static file workers (GRADIO_NUM_WORKERS) would serve /file= behind gradio's SSR front,
        # where the middleware above never sees the request.
        num_workers=0,
        state_session_capacity=MAX_SESSIONS,
        max_file_size=0,  # the chat takes no files: refuse uploads instead of storing any size for anyone
        footer_links=["api", "gradio"],
        theme=page_theme(),
        css=CSS + LINK_PAGE_CSS + SIDEBAR_CSS + SLIDER_NOTES_CSS,
        head=LIVE_PAGE_HEAD + SIDEBAR_HEAD + SLIDER_NOTES_HEAD,
    )
    # gradio's own start-up lines ("Running on local URL", its hint to set `share=True`) say less
    # than ours, and too early (announce.py); with --share its public link is worth its lines.
    options["quiet"] = not settings.share
    options.update(overrides)
    if not overrides.get("quiet"):  # tests that launch in-process ask for quiet
        announce_start(runtime, settings)
    try:
        return demo.launch(**options)
    except OSError as exc:
        if not str(exc).startswith(GRADIO_CANNOT_BIND):
            raise  # not about the address: the traceback says what it is
        log.debug("launch failed", exc_info=True)
        print(f"app.py: error: {cannot_listen(settings, exc)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def distrust_forwarded_headers(trusted_proxy_hops: int) -> None:
    """The app's own rule (`--trusted-proxy-hops`, `ratelimit.client_key`) is the only one that
    reads X-Forwarded-For. uvicorn, which gradio starts with its defaults, otherwise believes the
    header from 127.0.0.1 (`FORWARDED_ALLOW_IPS`) and replaces the client's address with whatever
    a local caller wrote there, before the app sees it: every request a new address to the rate
    limits. Trusting no host turns that off; with hops > 0 the operator runs proxies, and the
    environment (uvicorn's own setting) is left as they made it."""
    if trusted_proxy_hops == 0:
        os.environ["FORWARDED_ALLOW_IPS"] = ""  # read by uvicorn.Config, which gradio makes at launch


# gradio 6.31's OSError for any failure to bind (a port in use, an address not this machine's).
GRADIO_CANNOT_BIND = "Cannot find empty port"


def cannot_listen(settings: Settings, exc: OSError) -> str:
    """gradio's bind failed after app.py's own check passed (`listening.py`): another program took
    the port in between, or the address changed; said as that check says it."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    return bind_failure(settings.host, settings.port, cause)
