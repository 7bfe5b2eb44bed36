"""What the UI needs from the running app: the load status and, once ready, the chat service."""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat import MAX_MESSAGE_CHARS, ChatService
from .engines.ladder import EngineChoice
from .engines.requests import EngineStats
from .loading import LoadStatus
from .metrics import AppMetrics
from .ratelimit import RateLimiter
from .sharing.links import ConversationLinks


@dataclass
class ChatRuntime:
    model_name: str
    context_length: int
    demo: bool = False
    zerogpu: bool = False  # each reply on a GPU of its own, for its own length (zerogpu.py)
    concurrency: int = 1  # requests the backend can serve at once
    max_message_chars: int = MAX_MESSAGE_CHARS  # for the page's counter, before the service exists
    status: LoadStatus = field(default_factory=LoadStatus)
    service: ChatService | None = None
    engine: object | None = None  # anything with `stats() -> EngineStats`
    engine_choice: EngineChoice | None = None  # which local engine serves, and why
    limiter: RateLimiter | None = None  # per user or address; None = no limit
    api_limiter: RateLimiter | None = None  # /v1's own: per access key or address; None = no limit
    trusted_proxy_hops: int = 0
    links: ConversationLinks | None = None  # conversation links (not --share); None = none offered
    metrics: AppMetrics = field(init=False)  # what GET /metrics serves; the chat service feeds it

    def __post_init__(self) -> None:
        self.metrics = AppMetrics(self.engine_stats)

    def engine_stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    def gpu_memory(self) -> GpuMemory | None:
        """The GPU's memory while a local engine serves on one; None otherwise."""
        return gpu_memory() if self.engine_choice is not None else None


@dataclass(frozen=True)
class GpuMemory:
    used_bytes: int  # by every process on the device, as the driver counts
    total_bytes: int


def gpu_memory() -> GpuMemory | None:
    """The current CUDA device's memory, or None when this process has not put anything on a
    GPU (asking would create a CUDA context, hundreds of MB, for nothing)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        free, total = torch.cuda.mem_get_info()
    except RuntimeError:  # a driver error, or ZeroGPU's stand-in outside a GPU call
        return None
    return GpuMemory(used_bytes=total - free, total_bytes=total)
