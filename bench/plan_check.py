"""A 24 GB card on a big one: ballast takes the memory a 24 GB card lacks, then the engine starts at
the app's default context and serves 10 streams at once. Used by `bench/device_check.py` (step
`plan_24gb`): slots planned (not 0), no request failed (no OOM), the memory it peaked at.
"""

from __future__ import annotations

import gc
import threading

import torch

from orca_space.engines.batched import BatchedEngine
from orca_space.params import SamplingParams

CARD_BYTES = 22 * 2**30  # what a 24 GB card (an L4, an A10G) shows free before the model loads
STREAMS = 10


def ballast_for(card_bytes: int = CARD_BYTES) -> torch.Tensor | None:
    """One allocation holding all free memory but `card_bytes`, so `mem_get_info` sees a smaller card."""
    free, _ = torch.cuda.mem_get_info()
    extra = free - card_bytes
    return torch.empty(extra, dtype=torch.uint8, device="cuda") if extra > 0 else None


def check_24gb_plan(
    build_model, context: int, prompts: list[list[int]], new_tokens: int, record: dict
) -> None:
    """Start the engine as the app does on a 24 GB card and run `STREAMS` requests at once."""
    ballast = ballast_for()
    record["ballast_gib"] = 0.0 if ballast is None else ballast.numel() / 2**30
    record["free_before_model_gib"] = torch.cuda.mem_get_info()[0] / 2**30
    model = engine = None
    try:
        model = build_model()
        record["free_after_model_gib"] = torch.cuda.mem_get_info()[0] / 2**30
        torch.cuda.reset_peak_memory_stats()
        engine = BatchedEngine(model, (), context)  # slots: device.default_slots, as the app plans them
        record["slots"] = engine.capacity
        if not engine.wait_ready(120):
            raise RuntimeError(f"the engine did not warm up: {engine.stats().failure}")
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.7, top_p=0.95, top_k=40, seed=1)
        finals: list = [None] * len(prompts)

        def run(serving: BatchedEngine, index: int) -> None:
            finals[index] = list(serving.submit(prompts[index], params))[-1]

        threads = [threading.Thread(target=run, args=(engine, i)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        errors = [f.error for f in finals if f is None or f.finish_reason == "error"]
        record.update(
            streams=len(prompts),
            finished=sum(f is not None and f.finish_reason == "length" for f in finals),
            errors=errors[:3],
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            free_at_end_gib=torch.cuda.mem_get_info()[0] / 2**30,
        )
        if record["slots"] < 1 or errors:
            record["status"] = f"failed: {record['slots']} slots, {len(errors)} failed requests"
    finally:
        if engine is not None:
            engine.close()
        del engine, model, ballast
        gc.collect()
        torch.cuda.empty_cache()
