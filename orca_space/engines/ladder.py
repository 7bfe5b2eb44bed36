"""Which local engine serves: the rungs tried, the one chosen, and why.

The ladder (fastest first) is `graphs` (the batched engine with its decode step replayed as
CUDA graphs), `eager` (the same engine without graphs) and `reference` (transformers'
`generate` with a streamer, one request at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

RUNGS = ("graphs", "eager", "reference")


@dataclass(frozen=True)
class RungFailure:
    """A rung that was tried and left: its name and why, in a sentence."""

    rung: str
    reason: str


@dataclass(frozen=True)
class EngineChoice:
    """The engine that serves, and the rungs above it that failed, in the order tried."""

    engine: str
    fallback: tuple[RungFailure, ...] = ()

    @property
    def degraded(self) -> bool:
        """Whether a faster rung was tried and failed: the page then says it is slower."""
        return bool(self.fallback)
