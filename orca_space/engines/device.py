"""What the batched engine asks of the device: memory planning, the attention kernel, host-to-device
staging, and which errors are fatal. The CUDA specifics live here, so the engine reads the same on
the CPU and on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import kv_cache

if TYPE_CHECKING:
    from .hf_weights import MistralWeights

log = logging.getLogger(__name__)

CPU_SLOTS = 4  # on the CPU there is no memory to plan; a few slots show the batching


def default_slots(device: torch.device, weights: MistralWeights, cache_len: int) -> int:
    """How many requests fit at once: the KV-cache slots the free GPU memory holds."""
    if device.type != "cuda":
        return CPU_SLOTS
    # What the allocator caches but no tensor uses goes back to the driver first. If it cannot
    # (an allocator a failed capture left behind: see capture.py), those cached blocks still
    # serve this engine's allocations, so they count as free: `mem_get_info` alone would leave a
    # failed rung's KV cache out, and a 24 GB card would plan no slot at all.
    released = release_cached_memory(device)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if not released:
        free_bytes += cached
    # Otherwise what stays cached is a hole between live tensors: no use to a KV cache allocated
    # whole. `mistral.stacked_rows` restacks through the host so that it leaves none; logged, so
    # a GPU run shows whether any remain.
    log.info(
        "planning KV slots: %.1f GiB free, %.2f GiB cached%s",
        free_bytes / 2**30,
        cached / 2**30,
        " (counted as free: the cache could not be released)" if not released else " in holes",
    )
    bytes_per_token = weights.shape.kv_bytes_per_token(weights.dtype)
    slots = kv_cache.plan_capacity(free_bytes, bytes_per_token, cache_len)
    if slots == 0:
        raise torch.cuda.OutOfMemoryError(
            f"no room for even one {cache_len}-entry KV cache ({bytes_per_token * cache_len / 2**30:.1f} "
            f"GiB) in the {free_bytes / 2**30:.1f} GiB left after loading; lower --context-length"
        )
    return slots


# -- the attention kernel --

# PyTorch >= 2.11 prefers cuDNN attention on Hopper whenever a mask is passed: it builds an
# execution plan for every new shape (each prefill length), and has had wrong-output bugs. With
# cuDNN off, a masked call takes the memory-efficient kernel (flash attention takes no mask), and
# math is the fallback for what that refuses. Switched off once for the whole process, not
# around the engine's calls: SDPA's kernel choice is a process-wide setting, and a context
# manager on one engine's thread would be undone out of order by another's (a rung left stuck
# in its warm-up) exiting its own. The self-check's forward then uses the same kernels.


def choose_attention_kernels(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def attention_kernel_name(device: torch.device) -> str:
    """What the log and /healthz say about the attention kernel."""
    if device.type != "cuda":
        return "pytorch default (cpu)"
    return "memory-efficient, then math (cuDNN attention off)"


# -- host to device --


class HostStaging:
    """One pinned host buffer through which the engine's per-step inputs reach the device.

    A copy from pageable memory makes the host wait for the stream to drain; from pinned memory
    with `non_blocking=True` it is queued like a kernel, so the host goes on launching the step.
    Before the buffer is written again, the host waits on the event recorded after the last copy
    out of it: by then that copy has almost always long finished. On the CPU there is nothing to
    stage: plain tensors are made.
    """

    def __init__(self, device: torch.device, size: int = 4096) -> None:
        self.device = device
        self._host = torch.empty(size, dtype=torch.long, pin_memory=True) if device.type == "cuda" else None
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._pending = False

    def to_device(self, rows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Each list of ints as a long tensor on the device, through one host-to-device copy."""
        lengths = [len(row) for row in rows]
        flat = [value for row in rows for value in row]
        if self._host is None:
            return list(torch.tensor(flat, dtype=torch.long).split(lengths))
        staged = self._stage(flat)
        on_device = staged.to(self.device, non_blocking=True)
        self._record_copy()
        return list(on_device.split(lengths))

    def copy_into(self, targets: Sequence[torch.Tensor], rows: Sequence[Sequence[int]]) -> None:
        """Write each list of ints into its device tensor (same length), without a host sync."""
        if self._host is None:
            for target, row in zip(targets, rows):
                target.copy_(torch.tensor(row, dtype=torch.long))
            return
        staged, start = self._stage([value for row in rows for value in row]), 0
        for target, row in zip(targets, rows):
            target.copy_(staged[start : start + len(row)], non_blocking=True)
            start += len(row)
        self._record_copy()

    def _stage(self, flat: list[int]) -> torch.Tensor:
        if self._pending:
            self._copied.synchronize()  # the last copy has left the buffer
        if len(flat) > self._host.numel():  # a long packed prompt: grow once, keep the size
            self._host = torch.empty(2 * len(flat), dtype=torch.long, pin_memory=True)
        self._host.numpy()[: len(flat)] = flat
        return self._host[: len(flat)]

    def _record_copy(self) -> None:
        self._copied.record()
        self._pending = True


# -- errors and memory --


# An allocation the device refused, raised outside the caching allocator (cuBLAS creating its
# workspace, a kernel's own cudaMalloc): the context is fine, only that step could not run.
ALLOCATION_FAILURES = ("out of memory", "alloc_failed", "cudaerrormemoryallocation")
# Errors that leave the CUDA context unusable for every later call (they are "sticky").
STICKY_FAILURES = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "hardware stack error",
    "uncorrectable ecc",
    "launch timed out",
)


def is_fatal_device_error(exc: BaseException) -> bool:
    """A device-side assert or illegal address poisons the CUDA context for the whole process;
    running out of memory, wherever it is raised, is a failure of the one step."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    text = str(exc).lower()
    if any(sticky in text for sticky in STICKY_FAILURES):
        return True
    if any(failure in text for failure in ALLOCATION_FAILURES):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or (isinstance(exc, RuntimeError) and "cuda error" in text)


def release_cached_memory(device: torch.device) -> bool:
    """Hand memory no tensor uses back to the driver (after a failure, or an engine closing).
    Never raises: a CUDA context that is gone has nothing left to release, and an allocator a
    failed capture left in capture mode asserts (capture.py). False when nothing was released."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        log.warning("could not release cached GPU memory: %s: %s", type(exc).__name__, first_line)
        return False
    return True
