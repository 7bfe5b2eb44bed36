"""The engine's own host cost per decode step, with the model's work taken out.

    python bench/host_overhead.py [--out FILE]

On CUDA a decode step is one graph replay, and the engine thread does its Python (inputs,
bookkeeping, delivering tokens to every stream) between replays, not during them: single-stream
tokens/s is at most 1 / (graph time + host time). This measures the host time on any machine:
the tiny checkpoint's engine with the decode step replaced by one that only writes the next
tokens, and prefill by one that returns fixed logits, streamed to asyncio readers as the app does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orca_space.engines import mistral, packed  # noqa: E402
from orca_space.engines.batched import BatchedEngine  # noqa: E402
from orca_space.params import SamplingParams  # noqa: E402
from orca_space.tiny import build_model  # noqa: E402

TOKENS = 400  # per stream
CONCURRENCY = (1, 8, 32, 64)
REPEATS = 3


def hollow_engine(slots: int) -> BatchedEngine:
    """An engine whose model work costs nothing: what is left is the engine's own host time."""
    engine = BatchedEngine(build_model().eval(), (), context_length=1024, slots=slots, chunk_size=512)
    assert engine.wait_ready(30)
    vocab = engine.weights.shape.vocab

    def decode_step(batch, kv_len, *shortcuts):
        engine.buffers.next[:batch] = engine.buffers.tokens[:batch] % 1000 + 100  # an ordinary token

    engine.eager_step = decode_step
    # called through the modules, so this replaces them for the engine too (packed: the default
    # policy's forward; mistral: the padded one of `policy="fcfs"`)
    mistral.prefill = lambda weights, cache, chunks, *rest: torch.zeros(len(chunks), vocab)

    def packed_prefill(weights, cache, chunks, to_device=None, decode_rows=None, logits_for=None):
        rows = len(chunks) if logits_for is None else len(logits_for)
        return torch.zeros(rows, vocab), None

    packed.prefill = packed_prefill
    return engine


async def stream(engine: BatchedEngine, count: int) -> tuple[float, int]:
    params = SamplingParams(max_new_tokens=TOKENS, temperature=0.0, repetition_penalty=1.0)

    async def read(handle) -> int:
        return sum([event.token is not None async for event in handle])

    start = time.perf_counter()
    handles = [engine.submit([100 + i, 200, 300], params) for i in range(count)]
    tokens = sum(await asyncio.gather(*(read(h) for h in handles)))
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results = {
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "tokens_per_stream": TOKENS,
        "per_step_us": {},
    }
    for count in CONCURRENCY:
        engine = hollow_engine(slots=count)
        try:
            asyncio.run(stream(engine, count))  # warm-up
            runs = [asyncio.run(stream(engine, count)) for _ in range(REPEATS)]
        finally:
            engine.close()
        seconds = statistics.median(seconds for seconds, _ in runs)
        steps = TOKENS  # every stream gets one token per step
        results["per_step_us"][str(count)] = seconds / steps * 1e6
        print(
            f"{count:3d} streams: {seconds / steps * 1e6:7.0f} us of host time per decode step "
            f"({seconds / steps / count * 1e6:.1f} us per token)",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
