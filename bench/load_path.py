"""The app's own loading path on a GPU: from a checkpoint on disk to an engine ready to serve.

    python bench/load_path.py --out load.json           # CUDA
    python bench/load_path.py --tiny --out load.json    # CPU, the tiny checkpoint: checks the script

engine_bench.py builds its model in memory and gives the engine a fixed number of slots; this
follows the app instead: Mistral-7B-OpenOrca's shape with random fp16 weights is saved with
`save_pretrained`, loaded back through `loading.load_model` (transformers' `from_pretrained`
onto the GPU, exactly as the Space loads the real weights), and the engine plans its slots
from the memory left, at the app's default 8192-token context. It reports the load time, the
time to get ready after loading, the slots planned, and how much memory PyTorch keeps cached
but cannot hand back after the q/k/v and gate/up projections are stacked (freed weights can
leave holes inside the one block transformers loads into), then one reply's decode rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import build_full_model, build_tiny_model, decode_rate, random_prompts  # noqa: E402

from orca_space.engines import hf_weights  # noqa: E402
from orca_space.engines.batched import BatchedEngine  # noqa: E402
from orca_space.loading import load_model  # noqa: E402
from orca_space.params import SamplingParams  # noqa: E402

GIB = 2**30
CONTEXT = 8192  # the app's default --context-length
STOP_IDS = (32000, 32001, 2)  # <|im_end|>, <|im_start|>, </s>


def memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {
        "allocated_gib": torch.cuda.memory_allocated() / GIB,
        "reserved_gib": torch.cuda.memory_reserved() / GIB,
        "driver_free_gib": torch.cuda.mem_get_info()[0] / GIB,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("the full-size run needs CUDA; use --tiny on the CPU")
    device = "cpu" if args.tiny else "cuda"
    results: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "context_length": CONTEXT,
    }
    checkpoint = Path(tempfile.mkdtemp(prefix="orca-ckpt-"))
    try:
        started = time.perf_counter()
        model = build_tiny_model() if args.tiny else build_full_model(device)
        model.save_pretrained(checkpoint)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        results["save_s"] = time.perf_counter() - started
        print(f"saved in {results['save_s']:.0f}s", flush=True)

        started = time.perf_counter()
        model = load_model(checkpoint, device)
        if device == "cuda":
            torch.cuda.synchronize()
        results["load_s"] = time.perf_counter() - started
        results["after_load"] = memory()
        print(f"loaded in {results['load_s']:.1f}s: {results['after_load']}", flush=True)

        hf_weights.weights_from_hf(model)  # the stacking the engine does first (it reuses this)
        if device == "cuda":
            torch.cuda.empty_cache()
        after = memory()
        if after:
            after["stranded_gib"] = after["reserved_gib"] - after["allocated_gib"]
        results["after_stacking"] = after
        print(f"after stacking: {after}", flush=True)

        engine = BatchedEngine(model, STOP_IDS, CONTEXT)
        try:
            if not engine.wait_ready(300):
                raise RuntimeError(f"engine not ready: {engine.stats().failure}")
            results.update(ready_s=engine.ready_s, slots=engine.capacity, cache_len=engine.cache_len)
            results["after_ready"] = memory()
            print(f"ready in {engine.ready_s:.1f}s with {engine.capacity} slots", flush=True)
            params = SamplingParams(max_new_tokens=256, temperature=0.4, top_p=0.95, top_k=40, seed=0)
            for attempt in range(2):  # the first one warms up prefill
                handle = engine.submit(random_prompts(1, 512, seed=attempt)[0], params)
                times = [time.perf_counter() for event in handle if event.token is not None]
            results["single_stream_tok_s"] = decode_rate(times)
            print(
                f"one reply: {results['single_stream_tok_s']:.1f} tok/s over {len(times)} tokens", flush=True
            )
        finally:
            engine.close()
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
