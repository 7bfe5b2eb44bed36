"""Serving the page: the queue, `/healthz`, and launch settings that are safe on a public link."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from fastapi.routing import APIRoute

from .runtime import ChatRuntime
from .settings import Settings

log = logging.getLogger(__name__)
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
    }
    return body


def health_route(runtime: ChatRuntime) -> APIRoute:
    async def healthz() -> dict[str, Any]:
        return health(runtime)

    return APIRoute("/healthz", healthz, methods=["GET"], name="healthz")


def launch(demo: gr.Blocks, runtime: ChatRuntime, settings: Settings, **overrides: Any):
    """Queue and launch; `overrides` lets tests pass `prevent_thread_lock=True` and the like."""
    if settings.share and settings.auth is None:
        log.warning(SHARE_WITHOUT_AUTH_WARNING)
        print(SHARE_WITHOUT_AUTH_WARNING, flush=True)
    # Waiting chats beyond max_queue get an immediate "queue is full" from gradio, not a hang.
    demo.queue(default_concurrency_limit=runtime.concurrency, max_size=settings.max_queue)
    options: dict[str, Any] = dict(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=settings.auth,
        auth_message="Log in to chat with Mistral-7B-OpenOrca.",
        app_kwargs={"routes": [health_route(runtime)]},
        enable_monitoring=False,  # no /monitoring dashboard on a public link
        footer_links=["api", "gradio"],
        theme=gr.themes.Soft(primary_hue="blue"),
    )
    options.update(overrides)
    return demo.launch(**options)
