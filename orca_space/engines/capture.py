"""Capturing the decode step as a CUDA graph without breaking the process when a capture fails.

Three things go wrong when `torch.cuda.graph` fails, and each is handled here:

1) the step does something a capture refuses (a host sync: `.item()`, `nonzero`, a pageable
   copy). `check_capturable` runs the step once under `torch.cuda.set_sync_debug_mode("error")`
   first, outside any capture, so such a step fails there with the op named, before a capture
   has touched the allocator;
2) the message: `torch.cuda.graph.__exit__` ends the capture, `cudaStreamEndCapture` throws
   "operation failed due to a previous error during capture", and the error that broke the
   capture is only that exception's `__context__`. `root_cause` finds it, so the ladder and
   the page say what failed;
3) the allocator: the capture ended by throwing before the caching allocator left capture mode
   (`endAllocateToPool` is the step after `cudaStreamEndCapture` in `CUDAGraph::capture_end`).
   `torch.cuda.empty_cache()` then trips `TORCH_INTERNAL_ASSERT(captures_underway...)` and the
   next rung dies starting. `end_failed_capture` takes the allocator out of capture mode, and
   `check_device` then proves the device works (a kernel, a sync, a cache release); if it does
   not, `DeviceUntrusted` tells the ladder to go on in a fresh process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# What cudaStreamEndCapture's failure says when an earlier call inside the capture broke it
# (cudaErrorStreamCaptureInvalidated): an echo, never the cause.
CAPTURE_ECHOES = ("previous error during capture", "capture invalidated", "was invalidated")


class CaptureFailed(RuntimeError):
    """A capture failed; the message names the real cause (see `describe`)."""


class NotCapturable(RuntimeError):
    """The step synchronizes with the host, which no CUDA graph can hold; the message says where."""


class DeviceUntrusted(RuntimeError):
    """After a failed capture the device or its allocator did not come back: nothing more should
    run in this process (the ladder goes on in a fresh one)."""


def root_cause(exc: BaseException) -> BaseException:
    """The error that broke a capture, not the capture's end reporting it: down the chain of
    `__cause__`/`__context__` while the message is only an echo of an earlier error."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        earlier = exc.__cause__ or exc.__context__
        if earlier is None or not _is_capture_echo(exc):
            return exc
        exc = earlier
    return exc


def _is_capture_echo(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(echo in text for echo in CAPTURE_ECHOES)


def describe(exc: BaseException) -> str:
    """`Type: message` of the real cause; the echo follows in brackets when there was one."""
    cause = root_cause(exc)
    text = f"{type(cause).__name__}: {cause}"
    if cause is not exc:
        text += f" (then, ending the capture: {type(exc).__name__}: {str(exc).splitlines()[0]})"
    return text


def check_capturable(step: Callable[[], None]) -> None:
    """Run `step` once with every host sync an error (the CUDA graph would refuse them)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as exc:
        if "synchroniz" in str(exc).lower():
            message = f"the decode step waits on the GPU, which a CUDA graph cannot hold: {exc}"
            raise NotCapturable(message) from exc
        raise
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def capture_graph(step: Callable[[], None], pool, device: torch.device) -> torch.cuda.CUDAGraph:
    """`step` captured into a new graph in `pool`. A failure raises the real cause; the allocator
    is out of capture mode again, or `DeviceUntrusted` says it could not be brought back."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            step()
    except Exception as exc:
        cause = root_cause(exc)
        end_failed_capture(device, pool)
        problem = check_device(device)
        if problem is not None:
            raise DeviceUntrusted(
                f"capturing failed ({describe(exc)}) and the GPU did not recover ({problem})"
            ) from cause
        raise CaptureFailed(describe(exc)) from cause
    return graph


def end_failed_capture(device: torch.device, pool) -> None:
    """The allocator step that a throwing `cudaStreamEndCapture` skipped. Raises nothing: when
    the capture did end properly, the allocator says it is not recording to that pool."""
    try:
        torch._C._cuda_endAllocateToPool(_index(device), pool)
    except Exception as exc:
        log.debug("the allocator was not capturing into the pool: %s", exc)


def check_device(device: torch.device) -> str | None:
    """None if the device runs a kernel, synchronizes and releases its cache; else what failed."""
    try:
        if torch.cuda.is_current_stream_capturing():
            return "the stream is still capturing"
        probe = torch.ones(8, device=device)
        if float((probe * 2).sum()) != 16.0:
            return "a kernel computed a wrong result"
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
