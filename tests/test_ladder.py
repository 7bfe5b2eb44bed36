"""The engine ladder: each rung's failure (raised, hung, wrong, out of memory) leads to the next rung,
releases what the failed rung held, and is told in order; the self-check catches wrong logits."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from orca_space.chatml import ChatEncoder
from orca_space.engines import kv_cache, ladder
from orca_space.engines.batched import BatchedEngine
from orca_space.engines.reference import ReferenceEngine
from orca_space.engines.selfcheck import PROBE_TOKENS, TOLERANCES, CheckFailed, check_step, run_self_check
from orca_space.engines.step_options import StepOptions
from orca_space.loading import ModelLoadError
from orca_space.startup import probe_prompts
from tests.engine_fakes import hanging, perturbing, raising, use_fake_graphs

CONTEXT = 1024


@pytest.fixture(scope="module")
def probes(encoder: ChatEncoder):
    return probe_prompts(encoder, CONTEXT)


def start(model, encoder, probes, choice="auto", warmup_timeout=30.0):
    engine, chosen = ladder.start_engine(
        model, encoder.controls.stop_ids, CONTEXT, probes, choice=choice, warmup_timeout=warmup_timeout
    )
    return engine, chosen


def test_the_probes_are_one_short_prompt_and_one_longer_than_a_prefill_chunk(probes):
    short, long = probes
    assert len(short) < 64 and len(long) > 512, [len(p) for p in probes]
    assert len(long) + PROBE_TOKENS <= CONTEXT


def test_auto_on_a_cpu_starts_at_eager_and_checks_it(tiny_model, encoder, probes):
    assert ladder.rungs_to_try("auto", cuda=False) == ["eager", "reference"]
    assert ladder.rungs_to_try("auto", cuda=True) == ["graphs", "eager", "reference"]
    engine, chosen = start(tiny_model, encoder, probes)
    try:
        assert isinstance(engine, BatchedEngine) and not engine.use_graphs
        assert chosen.engine == "eager" and not chosen.degraded
        check = chosen.self_check
        assert check.passed and check.tokens_checked == 2 * PROBE_TOKENS, check
        assert check.max_logit_diff < 1e-3, "fp32 on the CPU agrees with transformers to rounding"
    finally:
        engine.close()


def test_graphs_on_a_cpu_is_refused_in_one_sentence():
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU.*use --engine eager"):
        ladder.rungs_to_try("graphs", cuda=False)


def test_a_capture_that_raises_leads_to_eager_and_says_why(tiny_model, encoder, probes, monkeypatch):
    use_fake_graphs(monkeypatch, on_capture=raising("cudaErrorStreamCaptureUnsupported (injected)"))
    engine, chosen = start(tiny_model, encoder, probes)
    try:
        assert chosen.engine == "eager" and [f.rung for f in chosen.fallback] == ["graphs"]
        reason = chosen.fallback[0].reason
        assert reason.startswith("capturing the decode step for batch 4 over 1024 keys failed"), reason
        assert "cudaErrorStreamCaptureUnsupported" in reason
        assert "graphs failed: capturing the decode step" in chosen.story()
    finally:
        engine.close()


def test_a_capture_that_hangs_is_never_run_beside_the_next_rung(tiny_model, encoder, probes, monkeypatch):
    """Wedged for good (on CUDA): nothing more runs in this process; the app goes on in a fresh one."""
    release = threading.Event()
    fake = use_fake_graphs(monkeypatch, on_capture=hanging(release))
    monkeypatch.setattr(ladder, "STUCK_GRACE_S", 1.0)
    monkeypatch.setattr(ladder, "stuck_rung_blocks_the_process", lambda device: True)  # as on CUDA
    built: list[BatchedEngine] = []
    real_build = ladder.build_rung
    monkeypatch.setattr(ladder, "build_rung", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    started = time.monotonic()
    try:
        with pytest.raises(ladder.FreshProcessNeeded) as needed:
            start(tiny_model, encoder, probes, warmup_timeout=2.0)
        assert time.monotonic() - started < 15, "the Space does not wait on a wedged capture"
        assert len(built) == 1 and built[0]._thread.is_alive(), "no second rung beside the stuck one"
        assert needed.value.rungs == ["eager", "reference"]
        assert needed.value.failures[0].reason == "its warm-up ran past the 2 s deadline"
    finally:
        release.set()
        built[0]._thread.join(10)
    assert built[0].cache is None and len(fake.captured) == 1, "it lets go once the capture returns"


def test_a_capture_that_returns_late_is_waited_for_before_the_next_rung(
    tiny_model, encoder, probes, monkeypatch
):
    release = threading.Event()
    use_fake_graphs(monkeypatch, on_capture=hanging(release))
    built: list[BatchedEngine] = []
    alive_when_built: list[bool] = []
    real_build = ladder.build_rung

    def build(*args, **kwargs):
        alive_when_built.extend(engine._thread.is_alive() for engine in built)
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ladder, "build_rung", build)
    real_close = BatchedEngine.close
    # The capture returns while the ladder waits for the closed rung's thread.
    monkeypatch.setattr(
        BatchedEngine, "close", lambda self, timeout=10.0: (release.set(), real_close(self, timeout))
    )
    engine, chosen = start(tiny_model, encoder, probes, warmup_timeout=2.0)
    try:
        assert (
            chosen.engine == "eager" and chosen.fallback[0].reason == "its warm-up ran past the 2 s deadline"
        )
        assert alive_when_built == [False], "the stuck rung had ended before eager was built"
        assert built[0].cache is None, "and let its KV cache go"
        assert engine.submit(probes[0], chosen_params()).collect(30)[-1].finish_reason == "length"
    finally:
        engine.close()


def chosen_params():
    from orca_space.params import SamplingParams

    return SamplingParams(max_new_tokens=4, temperature=0.0)


def test_graphs_whose_logits_are_wrong_fail_the_self_check(tiny_model, encoder, probes, monkeypatch):
    use_fake_graphs(monkeypatch, on_replay=perturbing(0.5))
    engine, chosen = start(tiny_model, encoder, probes)
    try:
        assert chosen.engine == "eager"
        reason = chosen.fallback[0].reason
        assert (
            reason.startswith("its self-check failed: probe 1") and "differ from the model's by 0.5" in reason
        )
    finally:
        engine.close()


def test_graphs_that_pass_serve_and_capture_the_largest_first(tiny_model, encoder, probes, monkeypatch):
    fake = use_fake_graphs(monkeypatch)
    engine, chosen = start(tiny_model, encoder, probes)
    try:
        assert chosen.engine == "graphs" and chosen.self_check.passed and not chosen.degraded
        assert fake.captured[0] == (engine.capacity, engine.cache_len), "the largest shape first"
        assert fake.captured == sorted(fake.captured, reverse=True)
    finally:
        engine.close()


def test_when_eager_cannot_warm_up_the_reference_engine_serves(tiny_model, encoder, probes, monkeypatch):
    use_fake_graphs(monkeypatch, on_capture=raising())

    def no_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(kv_cache, "allocate_kv_cache", no_memory)
    engine, chosen = start(tiny_model, encoder, probes)
    try:
        assert isinstance(engine, ReferenceEngine) and chosen.engine == "reference"
        assert [f.rung for f in chosen.fallback] == ["graphs", "eager"]
        assert chosen.fallback[0].reason.startswith("allocating the KV cache"), (
            "graphs failed first, at allocation"
        )
        assert "ran out of memory" in chosen.fallback[1].reason
        assert chosen.self_check.passed
    finally:
        engine.close()


def test_when_every_rung_fails_the_app_says_what_each_one_said(tiny_model, encoder, probes, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available (injected)")

    monkeypatch.setattr(ladder, "build_rung", broken)
    with pytest.raises(ModelLoadError, match="No engine could start.*eager: starting it failed.*reference"):
        start(tiny_model, encoder, probes)


def test_a_named_engine_is_tried_alone(tiny_model, encoder, probes, monkeypatch):
    engine, chosen = start(tiny_model, encoder, probes, choice="reference")
    engine.close()
    assert chosen.engine == "reference" and not chosen.fallback
    monkeypatch.setattr(kv_cache, "allocate_kv_cache", raising("injected"))
    with pytest.raises(ModelLoadError, match="eager: allocating the KV cache"):
        start(tiny_model, encoder, probes, choice="eager")


FP32 = TOLERANCES[torch.float32]


def test_the_self_check_accepts_a_different_token_only_at_a_near_tie():
    expected = torch.tensor([0.0, 1.0, 1.0 - FP32.tie_margin / 2, 0.5])
    assert check_step(2, expected.clone(), expected, FP32, "t") == 0.0, "a near-tie may go either way"
    with pytest.raises(CheckFailed, match="chose token 3 where the model prefers 1 by 0.5"):
        check_step(3, expected.clone(), expected, FP32, "t")


@pytest.mark.parametrize(
    "token, change, fragment",
    [
        (1, {2: float("nan")}, "not all finite"),
        (1, {0: float("inf")}, "not all finite"),
        (7, {}, "token 7 is not in the vocabulary"),
        (1, {3: 0.5 + 0.01}, "differ from the model's by 0.01"),
    ],
)
def test_the_self_check_names_what_is_wrong(token, change, fragment):
    expected = torch.tensor([0.0, 1.0, 0.2, 0.5])
    logits = expected.clone()
    for index, value in change.items():
        logits[index] = value
    with pytest.raises(CheckFailed, match=fragment):
        check_step(token, logits, expected, FP32, "probe 1, token 1")


def test_a_self_check_that_cannot_run_fails_the_rung_instead_of_the_ladder(
    tiny_model, encoder, probes, monkeypatch
):
    from orca_space.engines import selfcheck

    def no_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(selfcheck, "reference_logits", no_memory)
    engine = BatchedEngine(tiny_model, encoder.controls.stop_ids, CONTEXT)
    try:
        result = run_self_check(engine, tiny_model, probes, 30)
    finally:
        engine.close()
    assert not result.passed and result.problem.startswith("the check itself failed (OutOfMemoryError")


def test_a_probe_that_fails_in_the_engine_fails_the_check(tiny_model, encoder, probes):
    class FailingEngine:
        def submit(self, prompt, params, record_logits=False):
            from orca_space.engines.requests import RequestHandle

            handle = RequestHandle(prompt, params, record_logits)
            handle.finish("error", "the GPU ran out of memory (injected)")
            return handle

    result = run_self_check(FailingEngine(), tiny_model, probes, 10)
    assert not result.passed and "probe 1 failed in the engine: the GPU ran out of memory" in result.problem


def test_the_compiled_rung_is_tried_first_only_where_the_device_check_chose_it(
    tiny_model, encoder, probes, monkeypatch
):
    assert ladder.rungs_to_try("auto", cuda=True, compiled_first=True) == [
        "compiled",
        "graphs",
        "eager",
        "reference",
    ]
    assert ladder.rungs_to_try("auto", cuda=False, compiled_first=True) == ["eager", "reference"]
    with pytest.raises(ModelLoadError, match="--engine compiled replays CUDA graphs"):
        ladder.rungs_to_try("compiled", cuda=False)

    def compiling_fails(batch, kv_len):
        raise RuntimeError("InductorError: no C compiler (injected)")

    compiled_flags = []
    fake = use_fake_graphs(monkeypatch, on_capture=compiling_fails)
    real_init = fake.__init__

    def init(self, weights, cache, buffers, compile_step=False, options=None):
        compiled_flags.append(compile_step)
        fake.on_capture = staticmethod(compiling_fails) if compile_step else None
        real_init(self, weights, cache, buffers, compile_step, options or decode_step_baseline())

    monkeypatch.setattr(fake, "__init__", init)
    monkeypatch.setattr(ladder, "defaults_for", lambda device_type: StepOptions(compiled=True))
    engine, chosen = start(tiny_model, encoder, probes)
    try:
        assert compiled_flags == [True, False], "the compiled step first, then the plain graphs"
        assert chosen.engine == "graphs" and [f.rung for f in chosen.fallback] == ["compiled"]
        assert "no C compiler" in chosen.fallback[0].reason
    finally:
        engine.close()


def decode_step_baseline():
    from orca_space.engines.step_options import BASELINE

    return BASELINE
