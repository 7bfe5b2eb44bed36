"""Every decode-step variant side by side in one run, against today's step, and the choice they make.

Used by `bench/device_check.py` (step `variants`); alone:

    python bench/step_variants.py --tiny --out variants.json     # the CPU: eager steps, the tiny model

For each batch size, each variant's step runs over the same cache (random keys, rows at varied
positions, every row sampling) from the same state: its logits are compared with today's step
(the self-check's tolerance for the dtype, and the greedy token: equal, or a near-tie), and its
time is the median replay of the step captured as a CUDA graph (on the CPU, the median eager step).
`choose` then builds the engine's default (`step_options.StepOptions`) from the fastest correct
variants: the fused parts if they win overall, split-KV attention up to the largest batch where
it wins at every batch size up to there, the compiled step if it wins overall. A variant that
fails a check or raises is never chosen; the JSON says why.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orca_space.engines import decode_step, hf_weights, kv_cache  # noqa: E402
from orca_space.engines.selfcheck import TOLERANCES  # noqa: E402
from orca_space.engines.step_options import BASELINE, StepOptions, write_defaults  # noqa: E402
from orca_space.engines.warmup import time_replays  # noqa: E402

FUSED_ALL = StepOptions(mask="additive", norm="fused", rope="fused")
VARIANTS = {
    "today": BASELINE,
    "fused_norm_rope": StepOptions(norm="fused", rope="fused"),
    "fused_all": FUSED_ALL,
    "fused_all_padded_vocab": replace(FUSED_ALL, pad_vocab=True),
    "split_kv": replace(FUSED_ALL, split_kv_up_to=1 << 30),
    "compiled": replace(FUSED_ALL, compiled=True),
}
# (rows, keys): batch 1 over a short and the whole ring (item 4 of issue 30), then busier steps.
FULL_SHAPES = [(1, 1024), (1, 4608), (8, 4608), (32, 1024), (64, 1024)]
TINY_SHAPES = [(1, 256), (4, 256)]
MARGIN = 0.02  # a variant must beat another by 2% to count as faster: replays vary by about that


def prepared(weights, batch: int, kv_len: int, seed: int = 0):
    """Cache and buffers for a step at `batch` rows over `kv_len` keys, and `reset`, which puts
    the cache back in its initial state (drawn again on the device: a copy of a 64-row cache
    would double its memory)."""
    cache = kv_cache.allocate_kv_cache(weights.shape, batch, kv_len, weights.dtype, weights.device)

    def reset() -> None:
        generator = torch.Generator(device=weights.device).manual_seed(seed)
        cache.k.normal_(0, 1, generator=generator), cache.v.normal_(0, 1, generator=generator)

    generator = torch.Generator().manual_seed(seed)
    buffers = decode_step.DecodeBuffers.allocate(batch, weights.shape.vocab, weights.device, weights.dtype)
    buffers.tokens.copy_(torch.randint(100, 31000, (batch,), generator=generator))
    # Rows spread over the keys (one at the end, so the bucket is needed), every row sampling.
    positions = torch.randint(kv_len // 4, kv_len, (batch,), generator=generator)
    positions[0] = kv_len - 1
    buffers.positions.copy_(positions)
    buffers.sampling.temperature.fill_(0.7), buffers.sampling.top_p.fill_(0.95)
    buffers.sampling.top_k.fill_(40)
    return cache, buffers, reset


def run_once(
    weights, cache, buffers, reset, batch: int, kv_len: int, options: StepOptions, step
) -> torch.Tensor:
    """The step's logits [B, V] in fp32 on the CPU, from the cache's initial state."""
    reset()
    step(weights, cache, buffers, batch, kv_len, keep_logits=True, options=options)
    return buffers.logits[:batch].to("cpu", torch.float32, copy=True)  # not a view of the buffer


def compare(logits: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> dict:
    """Against today's logits: the largest difference and whether it is within the self-check's
    tolerance, and whether every row's greedy token agrees (or is a near-tie)."""
    tolerance = TOLERANCES.get(dtype, TOLERANCES[torch.float16])
    difference = float((logits - reference).abs().max())
    allowed = tolerance.atol + tolerance.rtol * float(reference.abs().max())
    ours, best = logits.argmax(-1), reference.argmax(-1)
    gaps = reference.gather(-1, best[:, None]) - reference.gather(-1, ours[:, None])
    greedy_ok = bool((gaps <= tolerance.tie_margin).all()) and bool(torch.isfinite(logits).all())
    return {"max_diff": difference, "allowed": allowed, "greedy_equal": bool((ours == best).all()),
            "correct": difference <= allowed and greedy_ok}  # fmt: skip


def time_step(
    weights, cache, buffers, batch: int, kv_len: int, options: StepOptions, step, repeats: int
) -> float:
    """Median ms: the step replayed as a CUDA graph (as the engine runs it), or eager on the CPU."""
    if weights.device.type == "cuda":
        graphs = decode_step.DecodeGraphs(weights, cache, buffers, compile_step=False, options=options)
        graphs.step_fn = step
        graphs.capture(batch, kv_len)
        return next(iter(time_replays(graphs, [(batch, kv_len)], repeats).values()))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step(weights, cache, buffers, batch, kv_len, keep_logits=True, options=options)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def measure(weights, shapes: list[tuple[int, int]], repeats: int, names: list[str], deadline: float) -> dict:
    """{"B x L": {variant: {ms, max_diff, correct, ...} or {error}}}; stops adding at `deadline`."""
    results: dict = {}
    compiled_step = None
    for batch, kv_len in shapes:
        cache, buffers, reset = prepared(weights, batch, kv_len)
        with torch.inference_mode():
            reference = run_once(
                weights, cache, buffers, reset, batch, kv_len, BASELINE, decode_step.decode_and_sample
            )
        row = results[f"{batch}x{kv_len}"] = {}
        for name in names:
            if time.monotonic() > deadline:
                row[name] = {"error": "skipped: out of time"}
                continue
            options = VARIANTS[name]
            try:
                with torch.inference_mode():
                    if options.compiled and compiled_step is None:
                        compiled_step = torch.compile(
                            decode_step.decode_and_sample, fullgraph=True, dynamic=True
                        )
                    step = compiled_step if options.compiled else decode_step.decode_and_sample
                    logits = run_once(weights, cache, buffers, reset, batch, kv_len, options, step)
                    row[name] = compare(logits, reference, weights.dtype)
                    row[name]["ms"] = time_step(
                        weights, cache, buffers, batch, kv_len, options, step, repeats
                    )
            except Exception as exc:  # a variant that cannot run here is never chosen
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"  {batch:3d} rows x {kv_len:5d} keys  {name:16s} {row[name]}", flush=True)
        del cache, buffers, reset
        if weights.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def fastest(row: dict, names: list[str]) -> str | None:
    timed = {
        name: row[name]["ms"] for name in names if row.get(name, {}).get("correct") and "ms" in row[name]
    }
    return min(timed, key=timed.get) if timed else None


def choose(results: dict) -> tuple[StepOptions, dict]:
    """The default from the measurements (see the module docstring), and why, per batch size."""
    shapes = sorted(results, key=lambda shape: tuple(int(n) for n in shape.split("x")))
    plain = ["today", "fused_norm_rope", "fused_all", "fused_all_padded_vocab"]
    # The fused parts: the plain variant that is correct everywhere and fastest in total.
    everywhere = [n for n in plain if all(results[shape].get(n, {}).get("correct") for shape in shapes)]
    total = {n: sum(results[shape][n]["ms"] for shape in shapes) for n in everywhere}
    base_name = min(total, key=total.get) if total else "today"
    chosen = VARIANTS[base_name]
    why = {"base": f"{base_name}: correct at every batch, {total.get(base_name, 0):.2f} ms summed"}
    # Split-KV up to the largest batch where it beats the base at every shape up to there.
    split_up_to = 0
    for batch in sorted({int(shape.split("x")[0]) for shape in shapes}):
        rows = [results[shape] for shape in shapes if int(shape.split("x")[0]) == batch]
        if all(_beats(row.get("split_kv", {}), row.get(base_name, {})) for row in rows):
            split_up_to = batch
        else:
            break
    why["split_kv_up_to"] = split_up_to
    # The compiled step: correct everywhere and faster than the chosen step in total.
    compiled = [results[shape].get("compiled", {}) for shape in shapes]
    use_compiled = all(c.get("correct") and "ms" in c for c in compiled) and sum(
        c["ms"] for c in compiled
    ) < total.get(base_name, float("inf")) * (1 - MARGIN)
    why["compiled"] = use_compiled
    return replace(chosen, split_kv_up_to=split_up_to, compiled=use_compiled), why


def _beats(variant: dict, base: dict) -> bool:
    return (
        bool(variant.get("correct")) and "ms" in variant and variant["ms"] < base.get("ms", 0) * (1 - MARGIN)
    )


def decide(weights, shapes, repeats, names, deadline, defaults_path: Path | None) -> dict:
    """Measure, choose, and write the choice for this device type to `defaults_path`."""
    results = measure(weights, shapes, repeats, names, deadline)
    options, why = choose(results)
    device_type = weights.device.type
    evidence = {"device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
                "torch": torch.__version__, "why": why,
                "ms": {b: {n: r.get("ms") for n, r in row.items()} for b, row in results.items()}}  # fmt: skip
    if defaults_path is not None:
        write_defaults(defaults_path, device_type, options, evidence)
    return {"results": results, "chosen": asdict(options), "why": why}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from engine_bench import build_full_model, build_tiny_model

    model = build_tiny_model() if args.tiny else build_full_model("cuda")
    weights = hf_weights.weights_from_hf(model)
    names = [n for n in VARIANTS if n != "compiled" or not args.tiny]
    shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
    defaults = args.out.with_name("step-defaults.json")
    decided = decide(weights, shapes, 3 if args.tiny else 20, names, time.monotonic() + 300, defaults)
    args.out.write_text(json.dumps(decided, indent=2) + "\n")
    print(json.dumps(decided["chosen"]))


if __name__ == "__main__":
    main()
