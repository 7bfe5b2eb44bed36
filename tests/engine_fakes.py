"""Stand-ins that let the CPU walk the CUDA-only parts of the engine ladder.

`FakeGraphs` takes `decode_step.DecodeGraphs`'s place: "capturing" records the shape (or fails,
or hangs, as a test asks) and "replaying" runs the same step eagerly, keeping its logits as a
captured graph does. With it a `graphs` engine runs on the CPU: padded batches, captured shapes,
the warm-up's stages and the ladder's handling of each failure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from orca_space.engines import decode_step


class FakeGraphs:
    on_capture: Callable[[int, int], None] | None = None  # called before each capture: raise or block
    on_replay: Callable[[decode_step.DecodeBuffers, int], None] | None = None  # after each replay
    captured: list[tuple[int, int]] = []

    def __init__(self, weights, cache, buffers, compile_step=False, options=decode_step.BASELINE) -> None:
        self.weights, self.cache, self.buffers, self.options = weights, cache, buffers, options
        self.graphs: dict[tuple[int, int], None] = {}

    def capture(self, batch: int, kv_len: int) -> None:
        if FakeGraphs.on_capture is not None:
            FakeGraphs.on_capture(batch, kv_len)
        FakeGraphs.captured.append((batch, kv_len))
        self.graphs[(batch, kv_len)] = None

    def replay(self, batch: int, kv_len: int) -> None:
        assert (batch, kv_len) in self.graphs, f"no graph captured for batch {batch} over {kv_len} keys"
        decode_step.decode_and_sample(
            self.weights, self.cache, self.buffers, batch, kv_len, keep_logits=True, options=self.options
        )
        if FakeGraphs.on_replay is not None:
            FakeGraphs.on_replay(self.buffers, batch)


def use_fake_graphs(monkeypatch, on_capture=None, on_replay=None) -> type[FakeGraphs]:
    """Patch the graphs in, and let the ladder believe it has CUDA (for the graphs rung only)."""
    from orca_space.engines import ladder

    monkeypatch.setattr(decode_step, "DecodeGraphs", FakeGraphs)
    monkeypatch.setattr(FakeGraphs, "on_capture", staticmethod(on_capture) if on_capture else None)
    monkeypatch.setattr(FakeGraphs, "on_replay", staticmethod(on_replay) if on_replay else None)
    monkeypatch.setattr(FakeGraphs, "captured", [])
    real = ladder.rungs_to_try
    monkeypatch.setattr(
        ladder, "rungs_to_try", lambda choice, cuda, compiled_first=False: real(choice, True, compiled_first)
    )
    return FakeGraphs


def raising(message: str = "injected capture failure"):
    def capture(batch: int, kv_len: int) -> None:
        raise RuntimeError(message)

    return capture


def hanging(release: threading.Event):
    """A capture that blocks until `release` is set, as a wedged CUDA capture would."""

    def capture(batch: int, kv_len: int) -> None:
        release.wait(60)

    return capture


def perturbing(amount: float = 0.5):
    """Graphs whose logits are off by `amount` (what a wrong kernel would show the self-check)."""

    def replay(buffers: decode_step.DecodeBuffers, batch: int) -> None:
        buffers.logits[:batch] += amount

    return replay
