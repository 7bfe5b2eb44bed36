"""Where one decode step's time goes: kernel by kernel, and replayed whole as a CUDA graph.

    python bench/profile_step.py --out profile.json          # CUDA: Mistral-7B's shape, random fp16
    python bench/profile_step.py --tiny --out profile.json   # CPU: the tiny checkpoint (a smoke run)

For each batch size and each step variant (today's, and the one the engine would run here:
`step_options.defaults_for`) it runs `decode_step.decode_and_sample` (the engine's step) over a
cache filled with random keys, under torch.profiler, and reports the top kernels by time, the sum
of all kernel times and the aten ops the step dispatches (`op_count.py`); on CUDA it also times the
same step replayed as a graph (median of many). Graph time minus the kernel sum is what launch
gaps cost; the kernel sum against bytes moved / copy bandwidth says how far the kernels
themselves are from the memory floor. `bench/device_check.py` runs it too (`profile_batch`).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import build_full_model, build_tiny_model, sync  # noqa: E402
from op_count import count_aten_ops  # noqa: E402

from orca_space.engines import decode_step, hf_weights, kv_cache  # noqa: E402
from orca_space.engines.step_options import BASELINE, StepOptions, defaults_for  # noqa: E402

BATCHES = (1, 8, 32, 64)
KV_LEN = 1024  # a 512-token prompt plus its 256-token reply falls in this bucket
TOP = 12


def prepared_step(weights, batch: int, device: torch.device):
    """Cache and buffers for a step at `batch` rows, every row mid-reply with sampling on."""
    cache = kv_cache.allocate_kv_cache(weights.shape, batch, KV_LEN, weights.dtype, device)
    cache.k.normal_(0, 1), cache.v.normal_(0, 1)  # never time on zeros
    buffers = decode_step.DecodeBuffers.allocate(batch, weights.shape.vocab, device)
    buffers.tokens.copy_(torch.randint(100, 31000, (batch,)))
    buffers.positions.fill_(KV_LEN - 200)
    buffers.sampling.temperature.fill_(0.4), buffers.sampling.top_p.fill_(0.95)
    buffers.sampling.top_k.fill_(40), buffers.sampling.repetition_penalty.fill_(1.1)
    return cache, buffers


def kernel_table(step, device: torch.device) -> tuple[list[dict], float]:
    """Top kernels (or CPU ops) of one step by self time, and the sum over all of them (ms)."""
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    step(), sync(device)
    with profile(activities=[activity]) as prof:
        step()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device.type == "cuda":  # kernels only: the CPU-side wrappers carry no device time of their own
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total_ms = sum(getattr(e, attr) for e in events) / 1e3
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    top = [{"name": e.key[:90], "calls": e.count, "ms": getattr(e, attr) / 1e3} for e in events[:TOP]]
    return top, total_ms


def graph_ms(weights, cache, buffers, batch: int, options: StepOptions, repeats: int = 50) -> float:
    """Median time of the step replayed as one CUDA graph, captured as the engine captures it."""
    graphs = decode_step.DecodeGraphs(weights, cache, buffers, options=options)
    graphs.capture(batch, KV_LEN)
    graphs.replay(batch, KV_LEN)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs.replay(batch, KV_LEN)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_batch(weights, batch: int, device: torch.device, options: StepOptions) -> dict:
    """One batch size, one variant: top kernels, their sum, aten ops, and (CUDA) the graph's time."""
    with torch.inference_mode():
        cache, buffers = prepared_step(weights, batch, device)
        step = functools.partial(
            decode_step.decode_and_sample, weights, cache, buffers, batch, KV_LEN, options=options
        )
        top, total_ms = kernel_table(step, device)
        row = {"kernel_sum_ms": total_ms, "aten_ops": count_aten_ops(step)[0], "top": top}
        if device.type == "cuda":
            row["graph_ms"] = graph_ms(weights, cache, buffers, batch, options)
        del step, cache, buffers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("the full-size profile needs CUDA; use --tiny on the CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    model = build_tiny_model() if args.tiny else build_full_model("cuda")
    weights = hf_weights.weights_from_hf(model)
    results = {
        "device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        "kv_len": KV_LEN,
    }
    for name, options in (("today", BASELINE), ("chosen", defaults_for(device.type))):
        for batch in BATCHES:
            row = results[f"{name}_b{batch}"] = profile_batch(weights, batch, device, options)
            graph = f", graph {row['graph_ms']:.2f} ms" if "graph_ms" in row else ""
            print(
                f"{name} batch {batch}: {row['aten_ops']} aten ops, kernels {row['kernel_sum_ms']:.2f} ms{graph}"
            )
            for entry in row["top"][:6]:
                print(f"    {entry['ms']:8.3f} ms  x{entry['calls']:<4d} {entry['name']}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
