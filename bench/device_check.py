"""Everything a GPU must show, in one go of at most 9 minutes, the most decisive first.

    python bench/device_check.py --out $OUT/device-check.json   # CUDA: Mistral-7B's shape, random fp16
    python bench/device_check.py --tiny --out check.json        # CPU: the tiny checkpoint (CI runs this)

On the lent GPU machine, through the device tool, `bash bench/device_check.sh` (wheels, then this).
Each step has a time budget and the JSON is rewritten after every measurement, so a run cut
short still returns what it measured; a watchdog ends the run at `--budget` seconds whatever a
step is doing. Steps, in order:

1) versions: torch, CUDA, cuDNN, transformers, the GPU, the attention kernel the engine picks,
   and the torch the run certifies against the pinned one (a CUDA torch is too big to carry);
2) the bandwidth floor: copy bandwidth / weight bytes, the best batch-1 decode rate possible;
3) the decode-step variants side by side (`step_variants.py`: today's step, fused norm and rope,
   one additive mask, split-KV attention, the compiled step), each checked against today's
   logits and timed as a graph; the fastest correct one becomes the default the engine reads:
   on CUDA it is written to orca_space/engines/step_defaults.json in this copy (so every step
   after this one runs it) and to step-defaults.json beside --out, to be committed;
4) the engine ladder on the full-size model: which rung `auto` picks, its warm-up, its self-check;
5) greedy equality with `generate`: the first 64 tokens of a few prompts, or a near-tie said so;
6) the engine's speed: single stream, time to first token at 512 and 4096, 8 and 64 streams;
   then the scheduling policies (issue 31): a short chat beside a 4096-token prompt and a
   stream's gaps, decode kept a graph (`budget`) against one eager mixed step (`mixed`);
7) a 24 GB card's plan (`plan_check.py`): ballast leaves 22 GiB, the engine at the default
   context plans its slots and serves 10 streams at once without running out of memory;
8) where a step's time goes (`profile_step.py`): kernels of today's step and the chosen one;
9) the `gpu`-marked tests (graph capture, replay == eager, fp16 greedy equality);
10) (after 5) a conversation of 10 turns past 3,000 tokens: each turn's first token, continued
   from the kept KV cache, against a fresh prompt of the same length (turn 10 within 40 ms);
11) graph replay time per batch and key bucket;
12) cuDNN against memory-efficient attention (the SDPA call, and the whole step as a graph);
13) the compiled step in the engine, only if time is left;
14) the app's load path: checkpoint on disk -> from_pretrained -> ready engine (slots, stranded);
15) the slow baselines, short: generate + TextIteratorStreamer, the reference rung.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

STARTED = time.monotonic()  # the budget counts from here: torch's and transformers' imports included

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine_bench  # noqa: E402
import plan_check  # noqa: E402
import profile_step  # noqa: E402
import scheduling  # noqa: E402
import step_variants  # noqa: E402
from engine_bench import FULL, TINY, Workload, build_full_model, build_tiny_model, random_prompts  # noqa: E402

from orca_space.engines import decode_step, device, hf_weights, kv_cache, ladder, mistral, step_options  # noqa: E402
from orca_space.engines.selfcheck import TOLERANCES, reference_logits  # noqa: E402
from orca_space.params import SamplingParams  # noqa: E402

CONTEXT = 8192  # the app's default --context-length
GREEDY_TOKENS = 64
BUDGETS = {  # seconds per step; the whole run must stay inside --budget
    "versions": 10, "gpu_tests": 120, "floor": 10, "model": 30, "ladder": 90, "greedy": 45, "multiturn": 30,
    "speed": 120, "scheduling": 120, "variants": 150, "plan_24gb": 60, "profile": 30,
    "graph_replay": 30, "attention": 30, "compiled_step": 150, "load_path": 100, "reference": 45,
}  # fmt: skip


class Report:
    """The results so far, rewritten to `path` after every change; `step` times and guards a step."""

    def __init__(self, path: Path, budget: float, cuda: bool) -> None:
        self.path, self.data, self.cuda = path, {"steps": {}}, cuda
        self.deadline = STARTED + budget
        self.write()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    @contextlib.contextmanager
    def step(self, name: str, reserve: float = 0.0, needs_cuda: bool = False):
        """Run a step if it can run here and its budget (plus `reserve` for the steps after it) is
        left; record how it ended. A skipped step yields None."""
        record = {"budget_s": BUDGETS[name]}
        self.data["steps"][name] = record
        if needs_cuda and not self.cuda:
            record["status"] = "skipped: no CUDA"
        elif self.left() < BUDGETS[name] + reserve:
            record["status"] = f"skipped: {self.left():.0f} s left"
        if "status" in record:
            self.write()
            yield None
            return
        started = time.monotonic()
        try:
            yield record
            record.setdefault("status", "ok")
        except Exception as exc:  # one failed step must not lose the others
            record["status"] = f"failed: {type(exc).__name__}: {exc}"[:600]
            print(f"[{name}] {record['status']}", flush=True)
        finally:
            record["seconds"] = round(time.monotonic() - started, 2)
            self.write()
            print(f"[{name}] {record.get('status')} in {record['seconds']} s", flush=True)


def watchdog(report: Report) -> None:
    """End the process at the deadline, whatever a step is doing: the JSON is already written."""

    def expire() -> None:
        time.sleep(max(0.0, report.left()))
        try:  # the main thread may be changing the data: a failed last write must not keep us alive
            report.data["cut_short"] = "the --budget ran out"
            report.write()
            print("device check: budget spent, stopping", flush=True)
        finally:
            os._exit(3)

    threading.Thread(target=expire, daemon=True).start()


def versions(dev: torch.device) -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attention_kernel": device.attention_kernel_name(dev),
        "pinned_torch": pinned("torch"),
        "certified_torch": torch.__version__,  # what every figure below was measured with
    }
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        info.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            memory_total_gib=total / 2**30,
            memory_free_gib=free / 2**30,
        )
    return info


def pinned(package: str) -> str | None:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    return None


def variants(weights, tiny: bool, out: Path, record: dict) -> None:
    """Step 3: measure every variant, choose, and write the choice where the engine reads it."""
    shapes = step_variants.TINY_SHAPES if tiny else step_variants.FULL_SHAPES
    names = [name for name in step_variants.VARIANTS if name != "compiled" or not tiny]
    deadline = time.monotonic() + BUDGETS["variants"] - 10
    # The CPU run (CI) never rewrites the repository's defaults; the GPU run makes its choice the
    # engine's for the rest of this run, and hands it back beside --out.
    decided = step_variants.decide(
        weights, shapes, 3 if tiny else 20, names, deadline, out.with_name("step-defaults.json")
    )
    if not tiny:
        step_options.write_defaults(
            step_options.DEFAULTS_FILE, "cuda", step_options.StepOptions(**decided["chosen"]), decided["why"]
        )
    record.update(decided)


def gpu_tests(record: dict, timeout: float, log_path: Path) -> None:
    """The gpu-marked tests, all in test_batching.py: collecting the whole suite would import the
    app's web stack, which the GPU machine does not have. The log is written as they run, so a
    timeout still leaves what they printed."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    command += ["-p", "pytest_timeout", "tests/test_batching.py"]
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # the machine's own plugins stay out
    with open(log_path, "w") as log:
        try:
            done = subprocess.run(
                command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout
            )
            record["returncode"] = done.returncode
        except subprocess.TimeoutExpired:
            record["returncode"] = "timeout"
    output = log_path.read_text()
    record.update(summary=(output.strip().splitlines() or [""])[-1], output_tail=output[-3000:])
    if record["returncode"] != 0:
        record["status"] = f"failed: {record['summary']}"


def probes(context: int) -> list[list[int]]:
    """Random ids: the random-weight model reads no text. One short, one longer than a chunk."""
    return [random_prompts(1, 24, seed=7)[0], random_prompts(1, min(600, context - 16), seed=8)[0]]


def greedy_equality(engine, model, prompt_lens: list[int], tokens: int) -> list[dict]:
    """The engine's first `tokens` greedy tokens against `generate`'s; at the first difference,
    the gap between the two choices in the model's own logits says whether it is a near-tie."""
    tie = TOLERANCES.get(model.dtype, TOLERANCES[torch.float16]).tie_margin
    params = SamplingParams(
        max_new_tokens=tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0
    )
    rows = []
    for seed, length in enumerate(prompt_lens):
        prompt = random_prompts(1, length, seed=500 + seed)[0]
        ours = [e.token for e in engine.submit(prompt, params).collect(120) if e.token is not None]
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt], device=model.device), do_sample=False, max_new_tokens=tokens,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        theirs = out[0, len(prompt) :].tolist()
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        row = {"prompt_len": length, "tokens": len(ours), "equal": at is None and len(ours) == len(theirs)}
        if at is not None:
            logits = reference_logits(model, prompt, ours[: at + 1])[at]
            gap = float(logits[theirs[at]] - logits[ours[at]])
            row.update(first_difference=at, gap=gap, near_tie=abs(gap) <= tie)
        rows.append(row)
    return rows


def first_token_ms(engine, prompt: list[int], params: SamplingParams, scope: str | None):
    """(ms to the first token, the reply's tokens) of one request."""
    started, first, tokens = time.perf_counter(), None, []
    for event in engine.submit(prompt, params, cache_scope=scope):
        if event.finish_reason == "error":
            raise RuntimeError(event.error)
        if event.token is not None:
            first = first or time.perf_counter()
            tokens.append(event.token)
    return (first - started) * 1e3, tokens


def multiturn(engine, turns: int = 10, user_tokens: int = 290, reply_tokens: int = 48) -> dict:
    """A conversation's first token per turn, each turn's prompt the last one's plus its reply and
    a new message (about 340 tokens a turn: turn 10 is past 3,000), against a fresh prompt of the
    same length (no scope: nothing reused)."""
    params = SamplingParams(max_new_tokens=reply_tokens, temperature=0.0, top_k=0, repetition_penalty=1.0)
    prompt: list[int] = []
    rows = []
    for turn in range(1, turns + 1):
        prompt += random_prompts(1, user_tokens, seed=900 + turn)[0]
        continued_ms, reply = first_token_ms(engine, prompt, params, "device-check")
        fresh_ms, _ = first_token_ms(
            engine, random_prompts(1, len(prompt), seed=1900 + turn)[0], params, None
        )
        rows.append(
            {"turn": turn, "prompt_tokens": len(prompt), "continued_ms": continued_ms, "fresh_ms": fresh_ms}
        )
        prompt += reply + [32000, 13]  # the reply, <|im_end|>\n: what the next turn's prompt holds
    stats = engine.stats()
    return {
        "turns": rows,
        "turn10_first_token_ms": rows[-1]["continued_ms"],
        "prompt_tokens_reused": stats.prompt_tokens_reused,
        "prompt_tokens_prefilled": stats.prompt_tokens_prefilled,
    }


def time_graph(step, repeats: int = 20) -> float:
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(), step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def prepared_step(weights, batch: int, kv_len: int, backends=None):
    """A decode step at `batch` rows over `kv_len` random keys, every row sampling, under `backends`."""
    cache = kv_cache.allocate_kv_cache(weights.shape, batch, kv_len, weights.dtype, weights.device)
    cache.k.normal_(0, 1), cache.v.normal_(0, 1)  # never time on zeros
    buffers = decode_step.DecodeBuffers.allocate(batch, weights.shape.vocab, weights.device, weights.dtype)
    buffers.tokens.copy_(torch.randint(100, 31000, (batch,)))
    buffers.positions.fill_(kv_len - 1)
    (
        buffers.sampling.temperature.fill_(0.4),
        buffers.sampling.top_p.fill_(0.95),
        buffers.sampling.top_k.fill_(40),
    )

    def step():
        context = torch.nn.attention.sdpa_kernel(backends) if backends else contextlib.nullcontext()
        with context:
            decode_step.decode_and_sample(weights, cache, buffers, batch, kv_len, keep_logits=True)

    return step


def graph_replay(weights, record: dict) -> None:
    for batch in (1, 8, 32, 64):
        for kv_len in (256, 1024, 4608):
            with torch.inference_mode():
                record[f"batch{batch}_keys{kv_len}_ms"] = time_graph(prepared_step(weights, batch, kv_len))
            gc.collect(), torch.cuda.empty_cache()


def attention_kernels(weights, record: dict) -> None:
    """cuDNN against memory-efficient attention: SDPA alone (decode and a 512-token prefill) and
    the whole decode step as a graph; the output difference to the math kernel alongside."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = weights.shape
    cases = {"decode_b64_keys4608": (64, 1, 4608), "prefill_512": (1, 512, 512)}
    for name, (batch, queries, keys) in cases.items():
        q = torch.randn(batch, shape.heads, queries, shape.head_dim, device="cuda", dtype=weights.dtype)
        k, v = (
            torch.randn(batch, shape.kv_heads, keys, shape.head_dim, device="cuda", dtype=weights.dtype)
            for _ in "kv"
        )
        positions = torch.arange(keys - queries, keys, device="cuda").expand(batch, queries)
        mask = mistral.grouped_mask(kv_cache_mask(positions, keys, shape.sliding_window), shape.groups)
        with sdpa_kernel([SDPBackend.MATH]):
            exact = mistral.attend(q, k, v, mask).float()
        for backend in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            key = f"{name}_{backend.lower()}"
            try:
                with torch.inference_mode(), sdpa_kernel([getattr(SDPBackend, backend)]):
                    record[f"{key}_ms"] = time_graph(lambda: mistral.attend(q, k, v, mask), repeats=50)
                    record[f"{key}_max_diff"] = float(
                        (mistral.attend(q, k, v, mask).float() - exact).abs().max()
                    )
            except Exception as exc:
                record[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    for backend in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        for batch in (1, 64):
            try:
                with torch.inference_mode():
                    step = prepared_step(weights, batch, 1024, [getattr(SDPBackend, backend)])
                    record[f"step_b{batch}_keys1024_{backend.lower()}_ms"] = time_graph(step)
            except Exception as exc:
                record[f"step_b{batch}_{backend.lower()}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            gc.collect(), torch.cuda.empty_cache()


def kv_cache_mask(positions: torch.Tensor, keys: int, window: int | None) -> torch.Tensor:
    return mistral.attention_mask(positions, keys, keys, window)


def load_path(tiny: bool, dev: torch.device, record: dict):
    """The app's own path: save_pretrained, loading.load_model, a ready engine at the app's context.
    Returns the loaded model (the baselines after it use it)."""
    import shutil
    import tempfile

    from orca_space.loading import load_model

    checkpoint = Path(tempfile.mkdtemp(prefix="orca-ckpt-"))
    try:
        model = build_tiny_model() if tiny else build_full_model("cuda")
        model.save_pretrained(checkpoint)
        del model
        gc.collect(), device.release_cached_memory(dev)
        started = time.perf_counter()
        model = load_model(checkpoint, dev.type)
        record["load_s"] = time.perf_counter() - started
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    hf_weights.weights_from_hf(model)  # the restacking every engine starts with
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        record["stranded_gib"] = (torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / 2**30
        record["free_gib"] = torch.cuda.mem_get_info()[0] / 2**30
    engine = ladder.build_rung("graphs" if dev.type == "cuda" else "eager", model, (), CONTEXT, None)
    try:
        if not engine.wait_ready(90):
            raise RuntimeError(f"not ready: {engine.stats().failure}")
        record.update(ready_s=engine.ready_s, slots=engine.capacity, cache_len=engine.cache_len)
    finally:
        engine.close()
    return model


def reference_rung_rate(model, prompt: list[int], tokens: int) -> float:
    """The ladder's last rung, one reply: what a Space on it gets per stream."""
    from orca_space.engines.reference import ReferenceEngine

    engine = ReferenceEngine(model, (), CONTEXT)
    try:
        params = SamplingParams(max_new_tokens=tokens, seed=0, **engine_bench.SPACE_SAMPLING)
        handle = engine.submit(prompt, params)
        times = [time.perf_counter() for event in handle if event.token is not None]
        return engine_bench.decode_rate(times)
    finally:
        engine.close()


def profile(weights, dev: torch.device, record: dict) -> None:
    """Step 8: today's step and the chosen one, kernel by kernel, at batch 1 and the largest."""
    chosen = step_options.defaults_for(dev.type)
    for name, options in (("today", step_options.BASELINE), ("chosen", chosen)):
        for batch in (1, 64) if dev.type == "cuda" else (1, 4):
            record[f"{name}_b{batch}"] = profile_step.profile_batch(weights, batch, dev, options)


def run(args) -> None:
    dev = torch.device("cpu" if args.tiny else "cuda")
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("the full-size check needs CUDA; use --tiny on the CPU")
    report = Report(args.out, args.budget, cuda=dev.type == "cuda")
    watchdog(report)
    workload: Workload = (
        replace(TINY, new_tokens=16, concurrency=(1, 4), repeats=1)
        if args.tiny
        else replace(FULL, repeats=2, context_length=CONTEXT, concurrency=(1, 8, 64))
    )
    report.set(
        "device", f"cuda: {torch.cuda.get_device_name()}" if dev.type == "cuda" else "cpu, tiny checkpoint"
    )
    with report.step("versions") as record:
        report.set("versions", versions(dev))
    model = engine = None
    with report.step("model") as record:
        model = build_tiny_model() if args.tiny else build_full_model("cuda")
        record["weight_gb"] = engine_bench.weight_bytes(model) / 1e9
    with report.step("floor") as record:
        bandwidth = engine_bench.copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (256 << 20))
        report.set("floor_tok_s", bandwidth / engine_bench.weight_bytes(model))
        record["copy_bandwidth_gb_s"] = bandwidth / 1e9
    with report.step("variants") as record:
        if record is not None:
            variants(hf_weights.weights_from_hf(model), args.tiny, args.out, record)
            report.set("step_options", record["chosen"])
    figures: dict = {}
    report.set("engine", figures)
    with report.step("ladder") as record:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        engine, choice = ladder.start_engine(model, (), CONTEXT, probes(CONTEXT), "auto", BUDGETS["ladder"])
        figures.update(
            rung=choice.engine, ready_s=engine.ready_s, attention=engine.attention, slots=engine.capacity
        )
        figures["fallback"] = [asdict(failure) for failure in choice.fallback]
        record["self_check"] = choice.self_check.summary()
    report.write()
    if engine is not None:
        with report.step("greedy") as record:
            record["prompts"] = greedy_equality(engine, model, [16, 512, 1500], GREEDY_TOKENS)
            record["status"] = (
                "ok" if all(r["equal"] or r.get("near_tie") for r in record["prompts"]) else "failed: differs"
            )
        with report.step("multiturn") as record:
            figures["multiturn"] = multiturn(engine)
            record["turn10_first_token_ms"] = figures["multiturn"]["turn10_first_token_ms"]
        with report.step("speed") as record:
            measured = engine_bench.measure_engine(
                engine, workload, dev, on_figure=lambda r: (figures.update(r), report.write())
            )
            figures.update(measured)
        engine.close()
    engine = None
    gc.collect(), device.release_cached_memory(dev)
    with report.step("scheduling") as record:
        record["policies"] = scheduling.compare_policies(model, CONTEXT, 1000 if args.tiny else 4096)
    gc.collect(), device.release_cached_memory(dev)
    with report.step("profile") as record:
        if record is not None:
            profile(hf_weights.weights_from_hf(model), dev, record)
    with report.step("plan_24gb", needs_cuda=True) as record:
        if record is not None:
            held, model = model, None  # the plan check loads its own: the card must look 24 GB
            del held
            gc.collect(), torch.cuda.empty_cache()
            prompts = random_prompts(plan_check.STREAMS, 512, seed=77)
            plan_check.check_24gb_plan(lambda: build_full_model("cuda"), CONTEXT, prompts, 64, record)
            model = build_full_model("cuda")
    with report.step("gpu_tests", needs_cuda=True) as record:
        if record is not None:
            gpu_tests(record, BUDGETS["gpu_tests"], args.out.with_name("gpu-tests.log"))
    for name, measure in (("graph_replay", graph_replay), ("attention", attention_kernels)):
        with report.step(name, needs_cuda=True) as record:
            if record is not None:
                device.choose_attention_kernels(dev)
                measure(hf_weights.weights_from_hf(model), record)
    with report.step("compiled_step", BUDGETS["load_path"] + BUDGETS["reference"], needs_cuda=True) as record:
        if record is not None:
            record.update(
                engine_bench.engine_measurements(
                    model,
                    replace(workload, repeats=1, ttft_lengths=(512,), concurrency=(1, 64), slots=64),
                    dev,
                    True,
                )
            )
    del model
    gc.collect(), device.release_cached_memory(dev)
    model = None
    with report.step("load_path") as record:
        model = load_path(args.tiny, dev, record)
        report.set("load_path", record)
    with report.step("reference") as record:
        model = model or (build_tiny_model() if args.tiny else build_full_model("cuda"))
        prompt = random_prompts(1, workload.prompt_len, seed=0)[0]
        tokens = 16 if args.tiny else 64
        result = engine_bench.reference_single_stream(
            model, engine_bench.load_tokenizer_or_stub(), prompt, tokens, 1
        )
        result["rung_single_stream_tok_s"] = reference_rung_rate(model, prompt, tokens)
        report.set("reference", result)
    report.set("finished", True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU")
    parser.add_argument(
        "--budget", type=float, default=540.0, help="seconds for the whole run (default 9 minutes)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    run(args)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
