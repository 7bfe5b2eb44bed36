"""Wiring: settings -> (background) model loading -> engine -> chat service -> runtime."""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

from .chat import ChatLimits, ChatService, LocalBackend
from .chatml import ChatEncoder
from .engines.batched import BatchedEngine
from .engines.ladder import EngineChoice
from .loading import (
    LoadStatus,
    ModelLoadError,
    load_in_background,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_checkpoint,
)
from .ratelimit import RateLimiter
from .runtime import ChatRuntime
from .settings import Settings
from .tiny import is_tiny_checkpoint, write_tiny_checkpoint

log = logging.getLogger(__name__)
DEMO_DIR = Path.home() / ".cache" / "orca-space" / "tiny"
# Chats gradio streams at once. The page is built before the engine knows its capacity (that
# depends on the GPU memory left after loading), so this is generous: the engine runs
# `capacity` chats and queues the rest in order, telling each its place.
LOCAL_CONCURRENCY = 64


def chat_limits(settings: Settings) -> ChatLimits:
    return ChatLimits(
        context_length=settings.context_length,
        max_message_chars=settings.max_message_chars,
        max_input_tokens=settings.max_input_tokens,
    )


def new_runtime(settings: Settings, model_name: str, demo: bool, concurrency: int) -> ChatRuntime:
    return ChatRuntime(
        model_name=model_name,
        context_length=settings.context_length,
        demo=demo,
        concurrency=concurrency,
        limiter=RateLimiter(settings.rate_limit, window=60.0) if settings.rate_limit else None,
        trusted_proxy_hops=settings.trusted_proxy_hops,
    )


def start_local_runtime(settings: Settings) -> ChatRuntime:
    """Return at once; the model loads in the background and `runtime.service` appears when ready."""
    demo = settings.demo or is_tiny_checkpoint(settings.model)
    name = "tiny random-weight demo model" if demo else settings.model
    runtime = new_runtime(settings, name, demo, concurrency=LOCAL_CONCURRENCY)

    def load(status: LoadStatus) -> None:
        # Before any download: without a GPU, 14.5 GB of weights would be fetched for nothing.
        device = pick_device(require_cuda=not demo)
        checkpoint = (
            demo_checkpoint(status)
            if settings.demo
            else resolve_checkpoint(settings.model, status, settings.hf_token)
        )
        status.update("loading", f"Loading the weights onto the {device.upper()}…")
        tokenizer = load_tokenizer(checkpoint)
        model = load_model(checkpoint, device)
        encoder = ChatEncoder(tokenizer)
        engine = BatchedEngine(
            model,
            encoder.controls.stop_ids,
            settings.context_length,
            on_progress=lambda message, fraction: status.update("loading", message, fraction),
        )
        atexit.register(engine.close)  # stop the model thread before the interpreter tears down
        if not engine.wait_ready():  # on CUDA the decode graphs are captured first
            raise ModelLoadError(f"The engine could not start: {engine.stats().failure}")
        runtime.engine = engine
        runtime.engine_choice = EngineChoice("graphs" if engine.use_graphs else "eager")
        runtime.service = ChatService(
            LocalBackend(engine, encoder, tokenizer), encoder, chat_limits(settings)
        )
        status.update(
            "ready",
            f"Ready: {runtime.model_name} on {device.upper()}, {engine.capacity} chats at once.",
        )

    load_in_background(load, runtime.status)
    return runtime


def start_remote_runtime(settings: Settings) -> ChatRuntime:
    """Stream from an OpenAI-compatible server; only the tokenizer is loaded here."""
    from .remote import RemoteBackend

    runtime = new_runtime(
        settings, settings.model, is_tiny_checkpoint(settings.model), settings.remote_concurrency
    )

    def load(status: LoadStatus) -> None:
        checkpoint = resolve_checkpoint(settings.model, status, settings.hf_token, tokenizer_only=True)
        status.update("loading", "Loading the tokenizer…")
        encoder = ChatEncoder(load_tokenizer(checkpoint))
        backend = RemoteBackend(
            endpoint=settings.endpoint,
            model=settings.model,
            api_key=settings.api_key or settings.hf_token,
            timeout=settings.request_timeout,
            capacity=settings.remote_concurrency,
        )
        runtime.engine = backend
        runtime.service = ChatService(backend, encoder, chat_limits(settings))
        status.update("ready", f"Ready: streaming {settings.model} from {settings.endpoint}.")

    load_in_background(load, runtime.status)
    return runtime


def start_runtime(settings: Settings) -> ChatRuntime:
    if settings.backend == "remote":
        return start_remote_runtime(settings)
    return start_local_runtime(settings)


def demo_checkpoint(status: LoadStatus, directory: Path = DEMO_DIR) -> Path:
    if not is_tiny_checkpoint(directory):
        status.update("loading", "Building the tiny demo checkpoint…")
        write_tiny_checkpoint(directory)
    return directory
