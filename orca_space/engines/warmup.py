"""The batched engine's warm-up: stages that say what failed, and the capture of every decode graph.

A failure names its stage ("capturing the decode step for batch 64 over 4608 keys failed: ..."),
not "generation failed": it is what the ladder logs and the page shows when it moves on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from . import capture, kv_cache


class WarmUpFailed(RuntimeError):
    """A warm-up stage failed; the message says which ("capturing the decode step ... failed: ...")."""


class WarmUpAbandoned(RuntimeError):
    """The engine was closed while warming up (its warm-up ran past the ladder's deadline)."""


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Name the warm-up stage in any failure inside it."""
    try:
        yield
    except (WarmUpAbandoned, WarmUpFailed):
        raise
    except Exception as exc:
        cause = capture.root_cause(exc)  # not "operation failed due to a previous error during capture"
        if isinstance(cause, torch.cuda.OutOfMemoryError):
            detail = f"the GPU ran out of memory ({cause})"
        elif isinstance(exc, (capture.CaptureFailed, capture.DeviceUntrusted)):
            detail = str(exc)  # already names the real cause
        else:
            detail = capture.describe(exc)
        raise WarmUpFailed(f"{what} failed: {detail}") from exc


def capture_every_shape(
    graphs,
    batch_sizes: list[int],
    cache_len: int,
    compile_step: bool,
    progress: Callable[[str, float | None], None],
    closing: Callable[[], bool],
) -> None:
    """One graph per (batch, keys) bucket, the largest first: smaller graphs then fit in the
    memory pool the largest one already took, instead of growing it. Stops between captures
    once `closing()` (an engine left behind by the ladder, its warm-up past the deadline)."""
    buckets = kv_cache.kv_buckets(cache_len)
    shapes = [(batch, kv_len) for batch in reversed(batch_sizes) for kv_len in reversed(buckets)]
    for done, (batch, kv_len) in enumerate(shapes):
        if closing():
            raise WarmUpAbandoned("closed while capturing the decode step")
        if done == 0 and compile_step:  # the first capture compiles: most of a minute, silent
            what, message = "compiling the decode step", "Compiling the decode step (a minute or so)…"
        else:
            what = f"capturing the decode step for batch {batch} over {kv_len} keys"
            message = f"Capturing decode steps ({done + 1} of {len(shapes)}: batch {batch}, {kv_len} keys)…"
        progress(message, done / len(shapes))
        with stage(what):
            graphs.capture(batch, kv_len)


def time_replays(graphs, shapes: list[tuple[int, int]], repeats: int = 10) -> dict[str, float]:
    """Median milliseconds of a replay of each captured (batch, keys) shape, for the log and the
    ladder's story: what the rung's step costs on this GPU, measured where it serves."""
    timings = {}
    for batch, kv_len in shapes:
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs.replay(batch, kv_len)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        timings[f"batch {batch} over {kv_len} keys"] = sorted(times)[len(times) // 2]
    return timings
