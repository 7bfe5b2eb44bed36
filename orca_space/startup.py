"""Wiring: settings -> (background) model loading -> engine -> chat service -> runtime."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .chat import ChatLimits, ChatService, LocalBackend
from .chatml import ChatEncoder
from .engines.batched import CHUNK_SIZE
from .engines.ladder import EngineChoice, FreshProcessNeeded, RungFailure, rungs_to_try, start_engine
from .engines.selfcheck import PROBE_TOKENS
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
from .settings import Settings, api_requests_per_minute
from .sharing.links import ConversationLinks, ExpiredLinksPurge
from .sharing.store import StoreLimits
from .tiny import is_tiny_checkpoint, write_tiny_checkpoint

log = logging.getLogger(__name__)
DEMO_DIR = Path.home() / ".cache" / "orca-space" / "tiny"
# Chats gradio streams at once. The page is built before the engine knows its capacity (that
# depends on the GPU memory left after loading), so this is generous: the engine runs
# `capacity` chats and queues the rest in order, telling each its place.
LOCAL_CONCURRENCY = 64
# Set for a process started again by `relaunch`: the rungs that failed before, as JSON.
RESTART_ENV = "ORCA_ENGINE_LADDER_RESTART"


def relaunch(needed: FreshProcessNeeded) -> None:
    """Replace this process with a fresh one on the same command line, which goes on down the
    ladder from where this one stopped (`earlier_failures`). What a failed capture can leave
    behind (a wedged thread, an allocator or context that did not recover) goes with it."""
    os.environ[RESTART_ENV] = json.dumps([asdict(failure) for failure in needed.failures])
    log.critical("%s: %s", needed, " ".join(sys.orig_argv))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def earlier_failures() -> tuple[RungFailure, ...]:
    """The rungs an earlier process of this app left (see `relaunch`), in order; () if none."""
    raw = os.environ.pop(RESTART_ENV, None)
    if not raw:
        return ()
    return tuple(RungFailure(**failure) for failure in json.loads(raw))


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
        max_message_chars=settings.max_message_chars,
        limiter=RateLimiter(settings.rate_limit, window=60.0) if settings.rate_limit else None,
        api_limiter=per_minute(api_requests_per_minute(settings)),
        trusted_proxy_hops=settings.trusted_proxy_hops,
        links=conversation_links(settings),
    )


def per_minute(limit: int) -> RateLimiter | None:
    return RateLimiter(limit, window=60.0) if limit else None


def new_service(runtime: ChatRuntime, backend, encoder: ChatEncoder, settings: Settings) -> ChatService:
    return ChatService(backend, encoder, chat_limits(settings), metrics=runtime.metrics.replies)


def conversation_links(settings: Settings) -> ConversationLinks | None:
    """The store of conversation links, opened on first use (so a bad database never stops
    the app from starting); text only, so every backend gets the same."""
    if not settings.data_dir:
        return None
    limits = StoreLimits(
        max_snapshot_bytes=settings.link_max_kb << 10,
        max_total_bytes=settings.links_max_mb << 20,
        expiry_s=settings.link_expiry_days * 86400 or None,
    )
    log.info("Conversation links are kept in %s", settings.data_dir)
    links = ConversationLinks.in_directory(Path(settings.data_dir), limits, settings.links_per_hour)
    ExpiredLinksPurge(links.store).start()  # expired links gone from the disk within a minute
    return links


def start_local_runtime(settings: Settings) -> ChatRuntime:
    """Return at once; the model loads in the background and `runtime.service` appears when ready."""
    demo = settings.demo or is_tiny_checkpoint(settings.model)
    name = "tiny random-weight demo model" if demo else settings.model
    runtime = new_runtime(settings, name, demo, concurrency=LOCAL_CONCURRENCY)
    earlier = earlier_failures()

    def load(status: LoadStatus) -> None:
        # Before any download: without a GPU, 14.5 GB of weights would be fetched for nothing.
        device = pick_device(require_cuda=not demo)
        rungs_to_try(settings.engine, cuda=device == "cuda")  # an engine this machine cannot run: say so now
        checkpoint = (
            demo_checkpoint(status)
            if settings.demo
            else resolve_checkpoint(settings.model, status, settings.hf_token)
        )
        status.update("loading", f"Loading the weights onto the {device.upper()}…")
        tokenizer = load_tokenizer(checkpoint)
        model = load_model(checkpoint, device)
        encoder = ChatEncoder(tokenizer)
        try:
            engine, choice = start_engine(
                model,
                encoder.controls.stop_ids,
                settings.context_length,
                probe_prompts(encoder, settings.context_length),
                choice=settings.engine,
                warmup_timeout=settings.warmup_timeout,
                on_progress=lambda message, fraction: status.update("loading", message, fraction),
                prefix_cache=settings.prefix_cache,
                earlier=earlier,
            )
        except FreshProcessNeeded as needed:
            status.update("loading", f"Restarting: {needed}…")
            relaunch(needed)
        atexit.register(engine.close)  # stop the model thread before the interpreter tears down
        runtime.engine, runtime.engine_choice = engine, choice
        runtime.service = new_service(runtime, LocalBackend(engine, encoder, tokenizer), encoder, settings)
        status.update("ready", ready_message(runtime, device, engine, choice))

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
        runtime.service = new_service(runtime, backend, encoder, settings)
        status.update("ready", f"Ready: streaming {settings.model} from {settings.endpoint}.")

    load_in_background(load, runtime.status)
    return runtime


def start_zerogpu_runtime(settings: Settings, gpu=None) -> ChatRuntime:
    """ZeroGPU: load everything on the main thread before `launch()`, where the weights must be
    moved to `cuda` (ZeroGPU packs them at launch); each reply then runs in a GPU worker. Returns
    once loaded (or failed). `gpu` stands in for `spaces.GPU` in tests."""
    import torch

    from . import zerogpu

    demo = settings.demo or is_tiny_checkpoint(settings.model)
    name = "tiny random-weight demo model" if demo else settings.model
    runtime = new_runtime(settings, name, demo, concurrency=zerogpu.CONCURRENCY)
    runtime.zerogpu = True
    try:
        device = pick_device(require_cuda=not demo)  # ZeroGPU's emulation answers "cuda" here
        checkpoint = (
            demo_checkpoint(runtime.status)
            if settings.demo
            else resolve_checkpoint(settings.model, runtime.status, settings.hf_token)
        )
        runtime.status.update("loading", f"Loading the weights for ZeroGPU ({device.upper()})…")
        tokenizer = load_tokenizer(checkpoint)
        # transformers loads on a pool of threads, and ZeroGPU's CUDA emulation sees only this
        # one: load on the CPU, then move the weights from here.
        model = load_model(checkpoint, "cpu", dtype=torch.float16 if device == "cuda" else None)
        if device == "cuda":
            model.to("cuda")
        encoder = ChatEncoder(tokenizer)
        backend = zerogpu.ZeroGPUBackend(
            zerogpu.make_gpu_reply(model, gpu or zerogpu.spaces_gpu()),
            encoder,
            tokenizer,
            zerogpu.CONCURRENCY,
        )
        runtime.engine, runtime.engine_choice = backend, EngineChoice("zerogpu")
        runtime.service = new_service(runtime, backend, encoder, settings)
        runtime.status.update("ready", f"Ready: {runtime.model_name} on ZeroGPU, one GPU per reply.")
    except ModelLoadError as exc:
        runtime.status.update("failed", str(exc))
    except Exception as exc:  # unexpected: keep the trace in the log, the reason on the page
        log.exception("loading for ZeroGPU failed")
        runtime.status.update("failed", f"Loading failed ({type(exc).__name__}: {exc}).")
    return runtime


def start_runtime(settings: Settings) -> ChatRuntime:
    if settings.backend == "remote":
        return start_remote_runtime(settings)
    if settings.zerogpu:
        return start_zerogpu_runtime(settings)
    return start_local_runtime(settings)


# The self-check's probes (see engines/selfcheck.py): a short chat, and one longer than a prefill
# chunk, so that chunked prefill and a packed decode step are both compared with the model.
SHORT_PROBE = "Hello! Who are you, and what can you do?"
PROBE_SYSTEM = "You are a helpful assistant. Answer briefly."
LONG_PROBE = (
    "Orcas live in every ocean, from the Arctic to the Antarctic. They hunt in family groups "
    "called pods, and each pod has calls of its own that the young learn from their elders. "
)


def probe_prompts(encoder: ChatEncoder, context_length: int) -> list[list[int]]:
    """The self-check's prompts, as ChatML ids; the long one is cut to fit the context."""
    short = encoder.encode_chat([{"role": "user", "content": SHORT_PROBE}])
    text = LONG_PROBE * (2 + CHUNK_SIZE // max(1, len(encoder.encode_message("user", LONG_PROBE))))
    system = {"role": "system", "content": PROBE_SYSTEM}
    long = encoder.encode_chat([system, {"role": "user", "content": text}])
    room = context_length - PROBE_TOKENS
    return [short[:room], long[: min(CHUNK_SIZE + 64, room)]]


def ready_message(runtime: ChatRuntime, device: str, engine, choice: EngineChoice) -> str:
    """The console's and the page's last word on loading: what serves, and why not faster."""
    at_once = f"{engine.capacity} chats at once" if engine.capacity > 1 else "one chat at a time"
    message = f"Ready: {runtime.model_name} on {device.upper()}, {at_once}, on the {choice.engine} engine."
    if choice.degraded:
        left = "; ".join(f"{f.rung} failed: {f.reason}" for f in choice.fallback)
        message += f" Not the fastest engine: {left}."
    return message


def demo_checkpoint(status: LoadStatus, directory: Path = DEMO_DIR) -> Path:
    if not is_tiny_checkpoint(directory):
        status.update("loading", "Building the tiny demo checkpoint…")
        write_tiny_checkpoint(directory)
    return directory
