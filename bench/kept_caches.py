"""Two live streams beside six kept caches against two alone: does a slot holding an ended
request's cache slow the requests that are still generating?

    python bench/kept_caches.py --out bench/results/DATE-kept-caches-cpu.json

Engine only, on the CPU, with the small random-weight model (`small_model.py`). Eight slots. In
"beside": eight requests arrive together, six end after two tokens (leaving their caches in rows
0-5) and two go on for `--tokens` (admitted into rows 6 and 7); their decode rate is measured
after the six have ended. In "alone": the same two requests with nothing else. Runs on any
version of the engine (one without `cache_scope` just frees the six slots), so the same script
measures the code before and after a change. Greedy, so both runs decode the same tokens.
"""

from __future__ import annotations

import argparse
import inspect
import json
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


def greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)


def prompt(seed: int, length: int = 64) -> list[int]:
    return torch.randint(100, 31000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def submit(engine, ids, params, scope):
    if "cache_scope" in inspect.signature(engine.submit).parameters:
        return engine.submit(ids, params, cache_scope=scope)
    return engine.submit(ids, params)


def arrival_times(handles) -> list[list[float]]:
    """Each stream's token arrival times, read as they come (one reader thread per stream)."""
    times: list[list[float]] = [[] for _ in handles]

    def read(index: int) -> None:
        for event in handles[index]:
            if event.token is not None:
                times[index].append(time.perf_counter())

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(handles))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    return times


def run(engine, tokens: int, beside: bool) -> float:
    """The two live streams' decode rate in all, over the steps after the six short ones ended."""
    with engine._wakeup:  # all arrive in the same iteration, in this order
        short = [submit(engine, prompt(10 + i), greedy(2), f"ended-{i}") for i in range(6)] if beside else []
        live = [submit(engine, prompt(i), greedy(tokens), "live") for i in range(2)]
    times = arrival_times(short + live)
    ended = max((t[-1] for t in times[: len(short)]), default=0.0)
    rate = 0.0
    for stream in times[len(short) :]:
        assert len(stream) == tokens
        later = [t for t in stream if t > ended]
        rate += (len(later) - 1) / (later[-1] - later[0])
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_small_model()
    results = {"device": f"cpu ({torch.get_num_threads()} threads)", "model": "small (bench/small_model.py)"}
    for case in ("alone", "beside"):
        rates = []
        for _ in range(args.repeats):
            engine = BatchedEngine(model, (), context_length=1024, slots=8, chunk_size=512)
            try:
                assert engine.wait_ready(60)
                run(engine, 8, case == "beside")  # warm-up
                rates.append(run(engine, args.tokens, case == "beside"))
            finally:
                engine.close()
        results[f"two_streams_{case}_tok_s"] = statistics.median(rates)
        results[f"two_streams_{case}_runs"] = rates
        print(case, rates, flush=True)
    results["beside_over_alone"] = results["two_streams_beside_tok_s"] / results["two_streams_alone_tok_s"]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
