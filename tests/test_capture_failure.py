"""A failed CUDA-graph capture leaves a process whose next rung works, and says the real cause; an
allocation failure raised outside the allocator fails one step, not the engine.

No GPU here: the CUDA calls are replaced by stand-ins that fail the way CUDA and PyTorch do (read
from torch 2.13's source): `torch.cuda.graph.__exit__` ends the capture, `cudaStreamEndCapture`
throws "operation failed due to a previous error during capture" with the real error as its
`__context__`, and the caching allocator stays in capture mode, so `empty_cache` trips an internal
assert until `endAllocateToPool` runs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from orca_space.engines import capture, device, hf_weights, ladder
from orca_space.engines.ladder import FreshProcessNeeded, RungFailure
from orca_space.params import SamplingParams
from orca_space.startup import probe_prompts
from tests.engine_fakes import use_fake_graphs
from tests.helpers import ROOT

GIB = 2**30
REAL_CAUSE = "CUDA error: operation not permitted when stream is capturing (injected)"
ECHO = "CUDA error: operation failed due to a previous error during capture (injected)"
CONTEXT = 1024


class CapturingAllocator:
    """The caching allocator and the capture, as CUDA and torch 2.13 behave around a failed capture."""

    def __init__(self, end_restores: bool = True) -> None:
        self.capturing = False
        self.end_restores = end_restores  # False: the allocator never comes back
        self.ended_pools: list[object] = []

    def install(self, monkeypatch) -> CapturingAllocator:
        allocator = self

        class Graph:  # torch.cuda.graph: capture_end throws before the allocator leaves capture mode
            def __init__(self, cuda_graph, pool=None, capture_error_mode="global") -> None:
                self.pool = pool

            def __enter__(self):
                allocator.capturing = True

            def __exit__(self, *exc_info):
                raise RuntimeError(ECHO)  # cudaStreamEndCapture: the capture was invalidated

        def empty_cache() -> None:
            if allocator.capturing:
                raise RuntimeError(
                    "INTERNAL ASSERT FAILED at CUDACachingAllocator.cpp: captures_underway.empty()"
                )

        def end_allocate_to_pool(device_index: int, pool) -> None:
            if not allocator.capturing:
                raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
            allocator.ended_pools.append(pool)
            allocator.capturing = not allocator.end_restores

        monkeypatch.setattr(torch.cuda, "graph", Graph)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
        monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end_allocate_to_pool, raising=False)
        return self


def failing_step() -> None:
    raise RuntimeError(REAL_CAUSE)  # e.g. a host sync inside the capture


def test_a_failed_capture_names_its_real_cause_and_leaves_the_allocator_usable(monkeypatch):
    allocator = CapturingAllocator().install(monkeypatch)
    with pytest.raises(capture.CaptureFailed) as failed:
        capture.capture_graph(failing_step, "pool-1", torch.device("cpu"))
    message = str(failed.value)
    assert message.startswith(f"RuntimeError: {REAL_CAUSE}"), "the cause first, not the capture's end"
    assert "previous error during capture" in message, "the echo is kept, after it"
    assert isinstance(failed.value.__cause__, RuntimeError) and str(failed.value.__cause__) == REAL_CAUSE
    assert allocator.ended_pools == ["pool-1"] and not allocator.capturing
    torch.cuda.empty_cache()  # what the next rung does first: no internal assert


def test_an_allocator_that_does_not_come_back_is_said_to_be_untrusted(monkeypatch):
    CapturingAllocator(end_restores=False).install(monkeypatch)
    with pytest.raises(capture.DeviceUntrusted, match="the GPU did not recover.*INTERNAL ASSERT") as failed:
        capture.capture_graph(failing_step, "pool-1", torch.device("cpu"))
    assert REAL_CAUSE in str(failed.value)


def test_a_step_that_syncs_with_the_host_is_refused_before_any_capture(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def syncing_step() -> None:  # what torch raises for `.item()` under sync debug mode "error"
        if modes[-1] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")

    with pytest.raises(capture.NotCapturable, match="waits on the GPU.*synchronizing CUDA operation"):
        capture.check_capturable(syncing_step)
    assert modes == ["error", 0], "the debug mode is put back"
    capture.check_capturable(lambda: None)


def test_the_root_cause_is_found_through_the_context_chain():
    try:
        try:
            failing_step()
        finally:
            raise RuntimeError(ECHO)
    except RuntimeError as echo:
        assert str(capture.root_cause(echo)) == REAL_CAUSE
    plain = RuntimeError("cudaErrorStreamCaptureUnsupported (injected)")
    assert capture.root_cause(plain) is plain


def fake_memory(monkeypatch, free: int, reserved: int, empty_cache_works: bool) -> None:
    def empty_cache() -> None:
        if not empty_cache_works:
            raise RuntimeError(
                "INTERNAL ASSERT FAILED at CUDACachingAllocator.cpp: captures_underway.empty()"
            )

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 24 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


MISTRAL_7B = hf_weights.ModelShape(
    layers=32, heads=32, kv_heads=8, head_dim=128, vocab=32002, sliding_window=4096, eps=1e-5
)


class ShapeOnly:
    shape, dtype = MISTRAL_7B, torch.float16


def test_slots_are_planned_after_a_failed_capture_left_the_cache_unreleasable(monkeypatch):
    """A 24 GB card: the failed rung's 6 GiB KV cache sits in the allocator's cache, which a failed
    capture keeps `empty_cache` from releasing; `mem_get_info` alone sees 2.5 GiB free."""
    fake_memory(monkeypatch, free=int(2.5 * GIB), reserved=6 * GIB, empty_cache_works=False)
    after_failure = device.default_slots(torch.device("cuda", 0), ShapeOnly(), 4608)
    fake_memory(monkeypatch, free=int(8.5 * GIB), reserved=6 * GIB, empty_cache_works=True)
    fresh = device.default_slots(torch.device("cuda", 0), ShapeOnly(), 4608)  # released: free only
    assert after_failure == fresh == 10, (
        "the cached blocks serve the next rung: as many slots as a fresh start"
    )


def test_releasing_cached_memory_never_raises_and_says_whether_it_did(monkeypatch):
    fake_memory(monkeypatch, free=GIB, reserved=GIB, empty_cache_works=False)
    assert device.release_cached_memory(torch.device("cuda", 0)) is False
    fake_memory(monkeypatch, free=GIB, reserved=GIB, empty_cache_works=True)
    assert device.release_cached_memory(torch.device("cuda", 0)) is True


@pytest.mark.parametrize(
    "error, fatal",
    [
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), False),
        (
            RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
            False,
        ),
        (torch.AcceleratorError("CUDA error: out of memory"), False),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (torch.AcceleratorError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("shapes cannot be multiplied"), False),
    ],
)
def test_only_errors_that_poison_the_context_are_fatal(error, fatal):
    assert device.is_fatal_device_error(error) is fatal


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_allocation_failure_outside_the_allocator_fails_one_step_not_the_engine(tiny_model, monkeypatch):
    from orca_space.engines.batched import BatchedEngine

    engine = BatchedEngine(tiny_model, (), 1024, slots=2)
    try:
        assert engine.wait_ready(30)
        params = SamplingParams(max_new_tokens=4, temperature=0.0)
        real_step = engine.eager_step

        def cublas_cannot_allocate(*args):
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

        monkeypatch.setattr(engine, "eager_step", cublas_cannot_allocate)
        failed = list(engine.submit([5, 6, 7], params))[-1]
        assert failed.finish_reason == "error" and "CUBLAS_STATUS_ALLOC_FAILED" in failed.error
        monkeypatch.setattr(engine, "eager_step", real_step)
        assert engine.stats().alive and engine.stats().failure is None, "the engine serves on"
        assert list(engine.submit([5, 6, 7], params))[-1].finish_reason == "length", "the next request works"
    finally:
        engine.close()


# -- the ladder after a failed capture --


@pytest.fixture(scope="module")
def probes(encoder):
    return probe_prompts(encoder, CONTEXT)


def capture_failing_as_cuda_does(batch: int, kv_len: int) -> None:
    try:
        failing_step()
    finally:
        raise RuntimeError(ECHO)


def test_the_ladder_says_the_real_cause_of_a_failed_capture(tiny_model, encoder, probes, monkeypatch):
    use_fake_graphs(monkeypatch, on_capture=capture_failing_as_cuda_does)
    engine, chosen = ladder.start_engine(tiny_model, (), CONTEXT, probes)
    try:
        assert chosen.engine == "eager"
        reason = chosen.fallback[0].reason
        assert reason.startswith(
            "capturing the decode step for batch 4 over 1024 keys failed: RuntimeError: "
        )
        assert reason.index(REAL_CAUSE) < reason.index("previous error during capture"), reason
    finally:
        engine.close()


def test_a_device_that_did_not_recover_sends_the_ladder_to_a_fresh_process(
    tiny_model, encoder, probes, monkeypatch
):
    def untrusted(batch: int, kv_len: int) -> None:
        raise capture.DeviceUntrusted("capturing failed (injected) and the GPU did not recover (injected)")

    use_fake_graphs(monkeypatch, on_capture=untrusted)
    built = []
    real_build = ladder.build_rung
    monkeypatch.setattr(ladder, "build_rung", lambda *a, **k: built.append(a[0]) or real_build(*a, **k))
    with pytest.raises(FreshProcessNeeded) as needed:
        ladder.start_engine(tiny_model, (), CONTEXT, probes)
    assert built == ["graphs"], "nothing more is built in this process"
    assert needed.value.rungs == ["eager", "reference"]
    assert [f.rung for f in needed.value.failures] == ["graphs"]
    assert "did not recover" in needed.value.failures[0].reason


def test_a_fresh_process_goes_on_from_the_next_rung_and_tells_the_whole_story(tiny_model, encoder, probes):
    earlier = (RungFailure("graphs", "capturing failed (injected)"),)
    engine, chosen = ladder.start_engine(tiny_model, (), CONTEXT, probes, earlier=earlier)
    try:
        assert chosen.engine == "eager" and chosen.fallback == earlier
        assert chosen.story() == "the eager engine serves (graphs failed: capturing failed (injected))"
    finally:
        engine.close()


def test_relaunch_replaces_the_process_and_hands_the_story_on():
    """The real `os.execv`: the same command line runs again, and reads what the first one left."""
    script = (
        "from orca_space import startup; from orca_space.engines.ladder import FreshProcessNeeded, RungFailure\n"
        "earlier = startup.earlier_failures()\n"
        "if earlier: print('second process:', earlier)\n"
        "else: startup.relaunch(FreshProcessNeeded((RungFailure('graphs', 'wedged'),), ['eager']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "second process: (RungFailure(rung='graphs', reason='wedged'),)" in done.stdout
