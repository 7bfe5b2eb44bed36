"""The engine panel for the Space's owner: which engine serves, its load, its speed, its memory.
Pure formatting (no gradio); the page refreshes it on a timer while the panel is open."""

from __future__ import annotations

from ...engines.requests import EngineStats
from ...runtime import ChatRuntime, GpuMemory

ENGINE_NAMES = {
    "graphs": "batched engine, decode step replayed as CUDA graphs",
    "eager": "batched engine, eager (no CUDA graphs)",
    "reference": "transformers `generate`, one chat at a time",
}
GIB = 1 << 30


def engine_markdown(runtime: ChatRuntime) -> str:
    status = runtime.status
    if status.failed:
        return f"❌ No engine: the model could not be loaded. {status.message}"
    if runtime.service is None:
        return f"⏳ No engine yet: {status.message}"
    rows = [("Engine", engine_name(runtime))]
    if runtime.engine_choice is not None and runtime.engine_choice.fallback:
        tried = "; ".join(f"`{failure.rung}`: {failure.reason}" for failure in runtime.engine_choice.fallback)
        rows.append(("Tried first", tried))
    stats = runtime.engine_stats()
    if stats is not None:
        rows.append(("Chats", f"{stats.active} active, {stats.queued} queued, capacity {stats.capacity}"))
        if not stats.alive:
            rows.append(("State", f"stopped: {stats.failure or 'the engine thread ended'}"))
        if stats.non_finite_replies:
            rows.append(("Non-finite logits", f"{stats.non_finite_replies} replies ended"))
        rows.append(("Prefix cache", prefix_cache_text(stats, runtime)))
    rows.append(("Speed", f"{runtime.service.meter.rate():,.1f} tok/s over the last minute"))
    rows.append(("Memory", memory_text(runtime)))
    # A table needs a header row; an empty one drew a blank bar above the figures.
    return "\n".join(["| What | Now |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


PREFIX_CACHE_MODES = {
    "private": "each visitor's conversation kept for their next turn",
    "shared": "kept conversations shared by every visitor",
}


def prefix_cache_text(stats: EngineStats, runtime: ChatRuntime) -> str:
    """What the engine reuses of earlier prompts, and how much it has reused."""
    if stats.prefix_cache == "server":
        return "left to the remote server (vLLM and TGI reuse prompts themselves)"
    if stats.prefix_cache == "off":
        return "off (`--prefix-cache off`): every prompt is prefilled whole"
    if stats.prefix_cache not in PREFIX_CACHE_MODES:
        zerogpu = runtime.engine_choice is not None and runtime.engine_choice.engine == "zerogpu"
        why = "each ZeroGPU worker ends with its reply" if zerogpu else "this engine prefills every prompt"
        return f"none: {why}"
    # A share, not counts: the panel is on the public page (see server.prefix_cache_fields).
    reused = stats.reused_share
    share = "no prompt yet" if reused is None else f"{reused:.0%} of the prompt tokens so far"
    return (
        f"{PREFIX_CACHE_MODES[stats.prefix_cache]}: {stats.kept_caches} of {stats.capacity} slots hold one; "
        f"reused {share}"
    )


def engine_name(runtime: ChatRuntime) -> str:
    if runtime.engine_choice is not None:
        choice = runtime.engine_choice.engine
        return f"`{choice}`: {ENGINE_NAMES.get(choice, choice)}"
    endpoint = getattr(runtime.engine, "endpoint", None)
    return f"remote server at {endpoint}" if endpoint else "remote server"


def memory_text(runtime: ChatRuntime) -> str:
    if runtime.engine_choice is None:
        return "on the remote server (out of sight)"
    memory = runtime.gpu_memory()
    return "CPU (no GPU in use)" if memory is None else gpu_memory_text(memory)


def gpu_memory_text(memory: GpuMemory) -> str:
    share = memory.used_bytes / memory.total_bytes if memory.total_bytes else 0.0
    return f"GPU: {memory.used_bytes / GIB:.1f} of {memory.total_bytes / GIB:.1f} GiB in use ({share:.0%})"
