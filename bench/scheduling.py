"""Stall-free batching (issue 31) against the policy before it, side by side in one run.

    python bench/scheduling.py --out bench/results/DATE-scheduling-cpu.json [--quick]

Engine only (no HTTP: the web layer adds the same to every policy), on the CPU, with a random
Mistral from `small_model.py` (`--size mid` is the hidden-512, 8-layer model the issue measured),
64 slots, greedy. For each configuration (a policy, its token budget, its prompt chunk and the
longest prompt that goes whole: `--configs`):

- a short chat's first-token time alone, and while a long prompt prefills (the short one arrives
  `--lag` ms after the long one), median of `--repeats`;
- a running stream's largest gap between tokens (and its 99th percentile) from the moment a
  long prompt arrives until that prompt is in, against its median gap before it arrived; the
  same stream with no long prompt (the control: the machine's own stalls);
- tokens per second in all at 8 and 64 streams arriving together (prefill included);
- and what it costs the long prompt itself: its first-token time alone, and beside the stream.

`fcfs` is the policy before (a 512-token chunk a step, oldest prompt first, padded rows);
`budget` runs decode (a CUDA graph on GPU) then packed prompt chunks in the rest of the budget,
no prompt more than `prompt_chunk` tokens a step; `mixed` runs both in one eager forward. The output is one JSON (and a table on stdout).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from small_model import build_small_model  # noqa: E402

from orca_space.engines.batched import BatchedEngine  # noqa: E402
from orca_space.params import SamplingParams  # noqa: E402

CONTEXT = 3584
SLOTS = 64
SHORT, LONG = 48, 3000  # prompt tokens of a short chat and of a pasted document
# The policy before; the defaults on a GPU (budget, the decode step a graph) and on a CPU (mixed,
# 4-token chunks beside streams, prompts up to 64 tokens whole); mixed with larger chunks.
CONFIGS = "fcfs:512,budget:512:16,mixed:512:4:64,mixed:512:16:64"


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)


class Prompts:
    """Fresh random prompts (no request shares a prefix: no kept cache is ever reused)."""

    def __init__(self) -> None:
        self.seed = 0

    def __call__(self, length: int) -> list[int]:
        self.seed += 1
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(100, 31000, (length,), generator=generator).tolist()


def first_token_s(engine: BatchedEngine, ids: list[int]) -> float:
    started = time.perf_counter()
    handle = engine.submit(ids, greedy(2))
    next(iter(handle))
    elapsed = time.perf_counter() - started
    list(handle)
    return elapsed


def short_beside_long_s(engine: BatchedEngine, prompts: Prompts, lag_s: float, long_len: int = LONG) -> float:
    long = engine.submit(prompts(long_len), greedy(1))
    time.sleep(lag_s)
    elapsed = first_token_s(engine, prompts(SHORT))
    list(long)
    return elapsed


def stream_gaps(
    engine: BatchedEngine, prompts: Prompts, before: int = 24, long_len: int = LONG, tokens: int | None = None
) -> dict:
    """A stream runs; after `before` tokens a long prompt arrives (none when `long_len` is 0: the
    control, the machine's own noise). The stream runs on until the long prompt is in: its gaps
    before and after, and the long prompt's own first-token time beside it."""
    chunk = engine.prompt_chunk if engine.policy != "fcfs" else engine.chunk_size
    tokens = tokens or before + -(-long_len // chunk) + 40
    times: list[float] = []
    long_first: list[float] = []

    def read_long(handle, submitted: float) -> None:
        next(iter(handle))
        long_first.append(time.perf_counter() - submitted)
        list(handle)

    reader = None
    for event in engine.submit(prompts(SHORT), greedy(tokens)):
        if event.token is None:
            continue
        times.append(time.perf_counter())
        if len(times) == before and long_len:
            long = engine.submit(prompts(long_len), greedy(1))
            reader = threading.Thread(target=read_long, args=(long, time.perf_counter()))
            reader.start()
    if reader is not None:
        reader.join()
    gaps = [b - a for a, b in zip(times, times[1:])]
    median_before, after = statistics.median(gaps[: before - 1]), sorted(gaps[before - 1 :])
    p99 = after[min(len(after) - 1, int(0.99 * len(after)))]
    return {
        "median_gap_ms": 1000 * median_before,
        "largest_gap_ms": 1000 * after[-1],
        "ratio": after[-1] / median_before,
        "p99_ratio": p99 / median_before,
        "median_gap_after_ms": 1000 * statistics.median(after),
        "long_first_token_beside_stream_ms": 1000 * long_first[0] if long_first else None,
    }


def throughput(engine: BatchedEngine, prompts: Prompts, streams: int, tokens: int) -> float:
    """Generated tokens per second, all streams arriving together, prefill included."""
    ids = [prompts(SHORT) for _ in range(streams)]
    started = time.perf_counter()
    with engine._wakeup:
        handles = [engine.submit(p, greedy(tokens)) for p in ids]
    counts = [0] * streams

    def read(index: int) -> None:
        counts[index] = sum(event.token is not None for event in handles[index])

    readers = [threading.Thread(target=read, args=(i,)) for i in range(streams)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    return sum(counts) / (time.perf_counter() - started)


def measure(model, policy: str, budget: int, prompt_chunk: int | None, whole: int | None, args) -> dict:
    engine = BatchedEngine(
        model,
        (),
        CONTEXT,
        slots=SLOTS,
        chunk_size=budget,
        policy=policy,
        prompt_chunk=prompt_chunk or budget,
        whole_prompt=whole,
    )
    assert engine.wait_ready(60), engine.stats().failure
    prompts = Prompts()
    try:
        first_token_s(engine, prompts(SHORT))  # warm up the allocator and the kernels
        alone, beside = [], []
        for _ in range(args.repeats):  # interleaved: the machine's load changes by the minute
            alone.append(first_token_s(engine, prompts(SHORT)))
            beside.append(short_beside_long_s(engine, prompts, args.lag / 1000))
        result = {
            "policy": policy,
            "budget": budget,
            "prompt_chunk": engine.prompt_chunk if policy != "fcfs" else None,
            "whole_prompt": whole,
            "short_alone_ms": 1000 * statistics.median(alone),
            "short_beside_long_ms": 1000 * statistics.median(beside),
            "short_ratio": statistics.median(beside) / statistics.median(alone),
            "long_alone_ms": 1000 * first_token_s(engine, prompts(LONG)),
            "stream": stream_gaps(engine, prompts),
            "control": stream_gaps(engine, prompts, long_len=0, tokens=160),
        }
        for streams in (8, 64):
            runs = [throughput(engine, prompts, streams, args.tokens) for _ in range(args.throughput_runs)]
            result[f"tok_s_{streams}"] = statistics.median(runs)
            result[f"tok_s_{streams}_runs"] = runs
        return result
    finally:
        engine.close()


DEVICE_CONFIGS = (("fcfs", None), ("budget", None), ("mixed", None), ("budget", 256))


def compare_policies(model, context: int, long_len: int, slots: int = 8) -> dict:
    """For `device_check.py`: each policy at this device's defaults (budget 512; on CUDA the
    `budget` policy's decode steps are graphs, the `mixed` policy's mixed steps eager), and the
    budget policy with a 256-token prompt chunk: a short chat's first token alone and beside a
    `long_len`-token prompt, and a running stream's gaps."""
    figures = {}
    for policy, chunk in DEVICE_CONFIGS:
        engine = BatchedEngine(model, (), context, slots=slots, policy=policy, prompt_chunk=chunk)
        assert engine.wait_ready(120), engine.stats().failure
        prompts = Prompts()
        try:
            first_token_s(engine, prompts(SHORT))  # warm-up
            alone = first_token_s(engine, prompts(SHORT))
            beside = short_beside_long_s(engine, prompts, 0.02, long_len)
            figures[policy if chunk is None else f"{policy}:{chunk}"] = {
                "prompt_chunk": engine.prompt_chunk,
                "short_alone_ms": 1000 * alone,
                "short_beside_long_ms": 1000 * beside,
                "stream": stream_gaps(engine, prompts, long_len=long_len),
            }
        finally:
            engine.close()
    return figures


def table(results: list[dict]) -> str:
    lines = [
        f"{'policy':>7} {'budget':>6} {'chunk':>5} | {'short alone':>11} {'beside long':>11} {'ratio':>5} | "
        f"{'median gap':>10} {'largest':>8} {'ratio':>5} {'p99':>4} {'ctl':>4} | {'tok/s 8':>7} {'tok/s 64':>8} | "
        f"{'long alone':>10} {'beside':>7}"
    ]
    for r in results:
        s = r["stream"]
        lines.append(
            f"{r['policy']:>7} {r['budget']:>6} {r['prompt_chunk'] or '-':>5} | {r['short_alone_ms']:>9.0f}ms {r['short_beside_long_ms']:>9.0f}ms "
            f"{r['short_ratio']:>5.1f} | {s['median_gap_ms']:>8.1f}ms {s['largest_gap_ms']:>6.0f}ms "
            f"{s['ratio']:>5.1f} {s['p99_ratio']:>4.1f} {r['control']['ratio']:>4.1f} | {r['tok_s_8']:>7.1f} "
            f"{r['tok_s_64']:>8.1f} | {r['long_alone_ms']:>8.0f}ms {s['long_first_token_beside_stream_ms'] / 1000:>6.1f}s"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        default=CONFIGS,
        help="policy:budget[:prompt_chunk[:whole_prompt]], comma-separated (chunk: the budget)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--lag", type=float, default=50.0, help="ms between the long prompt and the short one"
    )
    parser.add_argument("--throughput-runs", type=int, default=2, help="runs at 8 and 64 streams (median)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per stream in the throughput runs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", default="small", choices=("small", "mid", "wide"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_small_model(size=args.size)
    results = []
    with torch.inference_mode():
        for config in args.configs.split(","):
            policy, budget, chunk, whole = (config.split(":") + [None, None])[:4]
            results.append(
                measure(model, policy, int(budget), chunk and int(chunk), whole and int(whole), args)
            )
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    if args.out:
        report = {
            "command": " ".join(sys.argv),
            "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads",
            "model": f"random Mistral, bench/small_model.py {args.size}, float32, CPU",
            "short_prompt_tokens": SHORT,
            "long_prompt_tokens": LONG,
            "results": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
