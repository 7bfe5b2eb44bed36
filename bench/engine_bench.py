"""Measure the serving paths side by side, in one run, and write the numbers as JSON.

    python bench/engine_bench.py --out bench.json          # CUDA: Mistral-7B-OpenOrca's shape, random fp16
    python bench/engine_bench.py --tiny --out tiny.json    # CPU: the tiny checkpoint, smaller workload

What is measured (the same code in both modes, only the sizes differ):
1) the floor: device copy bandwidth / weight bytes = the best batch-1 decode rate possible;
2) the reference path: `generate` + `TextIteratorStreamer` on a thread (what a plain Space does);
3) transformers' continuous batching (`init_continuous_batching`, defaults), aggregate tok/s;
4) this engine (`BatchedEngine`): ready time, time to first token, single-stream and
   per-stream / aggregate tok/s at several concurrencies, peak memory.

Rules kept: random weights (never zeros), a warm-up before every timing, a device sync before
every clock read that follows device work, medians over repeats. Decode rates are
(tokens - 1) / (last token time - first token time), so they exclude the prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orca_space.engines.batched import BatchedEngine  # noqa: E402
from orca_space.params import SamplingParams  # noqa: E402

log = logging.getLogger("engine_bench")


@dataclass(frozen=True)
class Workload:
    prompt_len: int  # tokens per prompt in the throughput runs
    new_tokens: int  # tokens generated per stream
    cb_new_tokens: int  # per stream in transformers' continuous batching (it is slow; rates are per token)
    ttft_lengths: tuple[int, ...]
    concurrency: tuple[int, ...]
    repeats: int  # for medians
    context_length: int
    slots: int | None  # None: planned from free GPU memory


FULL = Workload(512, 256, 128, (512, 4096), (1, 8, 32, 64), 3, 4608, None)
TINY = Workload(64, 32, 32, (512, 4096), (1, 8, 32, 64), 3, 4608, 64)
# The Space's default sampling (the model card's), seeded so runs repeat.
SPACE_SAMPLING = dict(temperature=0.4, top_p=0.95, top_k=40, repetition_penalty=1.1)


# -- the model --


def build_full_model(device: str):
    """Mistral-7B-OpenOrca's exact shape with random fp16 weights (see shared/GPU_NOTES.md).

    The norms' weights stay at 1: drawn like the matrices (0.02), they would shrink every
    activation until the logits are ~0.03 apart and attention is uniform, and then no check of
    positions, masks or rope could fail."""
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=32002,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16 directly: no 29 GB fp32 detour
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():  # matrices as transformers initialises them; norms at 1, as it does too
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02) if parameter.dim() > 1 else parameter.fill_(1.0)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
    return model.eval()


def build_tiny_model():
    from orca_space.tiny import build_model

    return build_model().eval()


def load_tokenizer_or_stub():
    """The real Mistral tokenizer when `mistral-common` is installed, else ids as text (same cost class)."""
    try:
        from orca_space.tiny import build_tokenizer

        return build_tokenizer()
    except Exception as exc:  # e.g. a bare GPU machine without mistral-common
        log.warning("no tokenizer (%s); the streamer decodes ids as numbers", exc)

        class IdsAsText:
            def decode(self, ids, **kwargs):
                return " ".join(map(str, ids))

        return IdsAsText()


def random_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, 31000, (count, length), generator=generator).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(times: list[float]) -> float:
    """Tokens per second after the first token, from per-token arrival times."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


# -- 1) the floor --


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes read plus written per second by a device-to-device copy (median)."""
    source = torch.randn(nbytes // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    timings = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        timings.append(time.perf_counter() - start)
    return 2 * source.numel() * 4 / statistics.median(timings)


# -- 2) the reference path --


def reference_single_stream(model, tokenizer, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    from transformers import TextIteratorStreamer

    class TimedStreamer(TextIteratorStreamer):
        """Notes when each new token reaches the streamer (the first `put` is the prompt)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.times: list[float] = []

        def put(self, value):
            if not self.next_tokens_are_prompt:
                self.times.append(time.perf_counter())
            super().put(value)

    def run(tokens: int) -> tuple[float, float]:
        streamer = TimedStreamer(tokenizer, skip_prompt=True)
        inputs = torch.tensor([prompt], device=model.device)
        kwargs = dict(
            input_ids=inputs, streamer=streamer, max_new_tokens=tokens, do_sample=True, **SPACE_SAMPLING
        )
        start = time.perf_counter()
        thread = threading.Thread(target=model.generate, kwargs=kwargs)
        thread.start()
        for _ in streamer:  # the UI thread reads text as it comes
            pass
        thread.join()
        return decode_rate(streamer.times), (streamer.times[0] - start) * 1e3

    run(4)  # warm-up
    results = [run(new_tokens) for _ in range(repeats)]
    return {
        "single_stream_tok_s": statistics.median(r[0] for r in results),
        "ttft_ms": statistics.median(r[1] for r in results),
        "prompt_len": len(prompt),
        "new_tokens": new_tokens,
    }


# -- 3) transformers' continuous batching --


def transformers_continuous_batching(model, workload: Workload) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=workload.cb_new_tokens,
        do_sample=True,
        temperature=SPACE_SAMPLING["temperature"],
        top_p=SPACE_SAMPLING["top_p"],
        top_k=SPACE_SAMPLING["top_k"],
        eos_token_id=-1,  # never stop early: every stream generates all its tokens
        pad_token_id=0,
    )
    started = time.perf_counter()
    manager = model.init_continuous_batching(generation_config=config)
    if hasattr(manager, "warmup"):  # older transformers capture lazily instead
        manager.warmup()
    manager.start()
    ready_s = time.perf_counter() - started

    def run(prompts: list[list[int]], tokens: int) -> tuple[int, float]:
        start = time.perf_counter()
        manager.add_requests(prompts, max_new_tokens=tokens)
        finished: dict[str, object] = {}
        while len(finished) < len(prompts):
            result = manager.get_result(timeout=120)
            if result is None:
                raise RuntimeError("transformers continuous batching stopped answering")
            if result.is_finished():
                finished[result.request_id] = result
        generated = sum(len(r.generated_tokens) for r in finished.values())
        return generated, time.perf_counter() - start

    aggregate = {}
    try:
        for count in workload.concurrency:
            prompts = random_prompts(count, workload.prompt_len, seed=count)
            run(prompts, 8)  # warm-up at this batch size
            generated, seconds = run(prompts, workload.cb_new_tokens)
            aggregate[str(count)] = generated / seconds
            log.info("transformers CB: %d streams, %.1f tok/s aggregate", count, aggregate[str(count)])
    finally:
        manager.stop(block=True, timeout=60)
        manager.destroy()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"aggregate_tok_s": aggregate, "new_tokens": workload.cb_new_tokens, "ready_s": ready_s}


# -- 4) this engine --


async def stream_all(engine: BatchedEngine, prompts: list[list[int]], params: SamplingParams):
    """Submit every prompt at once and read all streams on one event loop, as the app does.

    Returns (per-stream token arrival times, submit time, last arrival time)."""

    async def read(handle) -> list[float]:
        times = []
        async for event in handle:
            if event.token is not None:
                times.append(time.perf_counter())
            elif event.finish_reason == "error":
                raise RuntimeError(event.error)
        return times

    start = time.perf_counter()
    handles = [engine.submit(p, params) for p in prompts]
    streams = await asyncio.gather(*(read(h) for h in handles))
    return streams, start, max(t[-1] for t in streams)


BURST = (16, 40)  # short prompts sent at once: (how many, tokens each)


def burst_ttft(run, repeats: int) -> dict:
    """Time to first token when BURST short prompts arrive together (medians over repeats)."""
    count, length = BURST
    medians, lasts = [], []
    for repeat in range(repeats + 1):
        streams, start, _ = run(random_prompts(count, length, seed=300 + repeat), tokens=1)
        firsts = sorted((times[0] - start) * 1e3 for times in streams)
        if repeat:  # the first one warms this shape up
            medians.append(statistics.median(firsts))
            lasts.append(firsts[-1])
    return {
        "prompts": count,
        "prompt_len": length,
        "median": statistics.median(medians),
        "last": statistics.median(lasts),
    }


def engine_measurements(model, workload: Workload, device: torch.device, compile_step: bool) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = BatchedEngine(
        model, (), workload.context_length, slots=workload.slots, compile_step=compile_step
    )
    try:
        if not engine.wait_ready(600):
            raise RuntimeError("the engine did not get ready within 10 minutes")
        return {**measure_engine(engine, workload, device), "compile_step": compile_step}
    finally:
        engine.close()


def measure_engine(engine, workload: Workload, device: torch.device, on_figure=None) -> dict:
    """Time to first token, single-stream and concurrent rates of a ready engine; `on_figure`
    (if given) gets the results so far after each measurement."""
    params = SamplingParams(max_new_tokens=workload.new_tokens, seed=0, **SPACE_SAMPLING)
    results: dict = {}

    def record(**figures) -> None:
        results.update(figures)
        if on_figure is not None:
            on_figure(dict(results))

    def run(prompts, tokens=workload.new_tokens):
        return asyncio.run(
            stream_all(engine, prompts, SamplingParams(**{**asdict(params), "max_new_tokens": tokens}))
        )

    run(random_prompts(1, workload.prompt_len, seed=1))  # warm-up: first prefill, first steps
    for length in workload.ttft_lengths:
        if length + 1 > engine.context_length:
            continue
        firsts = []
        for repeat in range(workload.repeats + 1):
            streams, start, _ = run(random_prompts(1, length, seed=100 + repeat), tokens=1)
            firsts.append((streams[0][0] - start) * 1e3)
        record(**{f"ttft_{length}_ms": statistics.median(firsts[1:])})  # the first warms this length up
    single = [
        decode_rate(run(random_prompts(1, workload.prompt_len, seed=200 + r))[0][0])
        for r in range(workload.repeats)
    ]
    record(single_stream_tok_s=statistics.median(single))
    record(burst_ttft_ms=burst_ttft(run, workload.repeats))
    per_stream, aggregate = {}, {}
    for count in workload.concurrency:
        if count > engine.capacity:  # more streams than slots is a queue, not a batch: not measured here
            continue
        run(random_prompts(count, workload.prompt_len, seed=count), tokens=8)  # warm-up at this size
        streams, start, end = run(random_prompts(count, workload.prompt_len, seed=count))
        per_stream[str(count)] = statistics.median(decode_rate(t) for t in streams)
        aggregate[str(count)] = sum(len(t) for t in streams) / (end - start)
        log.info(
            "engine: %d streams, %.1f tok/s each, %.1f aggregate",
            count,
            per_stream[str(count)],
            aggregate[str(count)],
        )
        record(per_stream_tok_s=dict(per_stream), aggregate_tok_s=dict(aggregate))
    sync(device)
    if device.type == "cuda":
        peak_gb, peak_kind = torch.cuda.max_memory_allocated(device) / 1e9, "cuda_max_memory_allocated"
    else:
        peak_gb, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "process_max_rss"
    graphs = getattr(engine, "graphs", None)
    record(
        ready_s=engine.ready_s,
        peak_mem_gb=peak_gb,
        peak_mem_kind=peak_kind,
        slots=engine.capacity,
        graphs=len(graphs.graphs) if graphs is not None else 0,
        prompt_len=workload.prompt_len,
        new_tokens=workload.new_tokens,
        context_length=engine.context_length,
    )
    return results


# -- the run --


def describe_device(device: torch.device, tiny: bool) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads){', tiny checkpoint' if tiny else ''}"


def run_all(tiny: bool, skip: set[str], compile_step: bool = False) -> dict:
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("the full-size benchmark needs CUDA; use --tiny on the CPU")
    device = torch.device("cuda" if not tiny else "cpu")
    workload = TINY if tiny else FULL
    model = build_tiny_model() if tiny else build_full_model("cuda")
    tokenizer = load_tokenizer_or_stub()
    results: dict = {
        "device": describe_device(device, tiny),
        "model": "tiny" if tiny else "mistral-7b-shape-fp16-random",
    }
    results["workload"] = asdict(workload)

    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (256 << 20))
    results["copy_bandwidth_gb_s"] = bandwidth / 1e9
    results["weight_gb"] = weight_bytes(model) / 1e9
    results["floor_tok_s"] = bandwidth / weight_bytes(model)
    log.info("floor: %.0f tok/s", results["floor_tok_s"])

    prompt = random_prompts(1, workload.prompt_len, seed=0)[0]
    if "reference" not in skip:
        results["reference"] = reference_single_stream(
            model, tokenizer, prompt, workload.new_tokens, workload.repeats
        )
        log.info("reference: %.1f tok/s", results["reference"]["single_stream_tok_s"])
    if "cb" not in skip:  # before our engine: its cache takes most of the free memory
        results["transformers_cb"] = transformers_continuous_batching(model, workload)
    if "engine" not in skip:
        results["engine"] = engine_measurements(model, workload, device, compile_step)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU (a smoke run)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--skip", nargs="*", default=[], choices=["reference", "cb", "engine"])
    parser.add_argument(
        "--compile-step", action="store_true", help="CUDA: torch.compile the decode step before capturing it"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = run_all(args.tiny, set(args.skip), args.compile_step)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
