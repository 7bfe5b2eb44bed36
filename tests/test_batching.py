"""The continuous-batching engine and its model math, on the tiny checkpoint (CPU) and on CUDA.

The reference for greedy decoding is transformers' own `generate(do_sample=False)`: the engine
must produce it token for token whether a request runs alone, shares a batch, or has its prompt
prefilled over several chunks.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from orca_space.engines import decode_step, hf_weights, kv_cache, mistral, packed
from orca_space.engines.batched import BatchedEngine
from orca_space.engines.sampling import NON_FINITE, SamplingTensors, sample_next_tokens
from orca_space.params import SamplingParams
from tests.helpers import wait_until_idle

NEW_TOKENS = 16
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, repetition_penalty=1.0)
CHUNK = 64  # small prefill chunks, so the longer prompts below need several
PROMPT_LENGTHS = (3, 40, 64, 150, 300)  # 150 and 300 tokens take 3 and 5 chunks


def make_prompt(length: int, offset: int = 0) -> list[int]:
    """Ordinary vocabulary ids (no control tokens), different for each length and offset."""
    return [(7 * i + 13 * length + offset) % 31000 + 100 for i in range(length)]


def prefill_chunk(weights, cache, tokens: torch.Tensor, start: int, slot: int) -> torch.Tensor:
    """One request's chunk: tokens [T] from position `start` into `slot` -> logits [1, V]."""
    return mistral.prefill(weights, cache, [mistral.PromptChunk(slot, start, tokens.tolist())])


def greedy_reference(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    out = model.generate(
        torch.tensor([prompt], device=model.device),
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,
    )
    reference = out[0, len(prompt) :].tolist()
    assert len(reference) == new_tokens, "the reference must not stop early"
    return reference


def tokens_of(handle) -> list[int]:
    return [event.token for event in handle if event.token is not None]


def final_event(handle):
    return list(handle)[-1]


@pytest.fixture(scope="module")
def prompts():
    return [make_prompt(n) for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def references(tiny_model, prompts):
    return [greedy_reference(tiny_model, p) for p in prompts]


@pytest.fixture()
def new_engine(make_engine):
    def build(**options) -> BatchedEngine:
        # The `budget` policy: its decode steps and prompt forwards are separate calls, which
        # these tests watch and break (`mixed`, one forward for both, is test_stall_free's).
        return make_engine(
            **{"context_length": 1024, "slots": 4, "chunk_size": CHUNK, "policy": "budget", **options}
        )

    return build


def record_calls(monkeypatch, engine: BatchedEngine) -> list[tuple]:
    """Log ('prefill', request id, tokens) and ('decode', batch, decoding rows) as they run."""
    log: list[tuple] = []
    real_prefill, real_decode = engine._prefill_forward, engine.eager_step

    def prefill(rows):
        log.extend(("prefill", slot.handle.id, take) for slot, take in rows)
        return real_prefill(rows)

    def decode(batch, *args):
        rows = sum(s is not None and s.decoding for s in engine._slots)
        log.append(("decode", batch, rows))
        return real_decode(batch, *args)

    monkeypatch.setattr(engine, "_prefill_forward", prefill)
    monkeypatch.setattr(engine, "eager_step", decode)
    return log


# -- greedy equality with transformers --


def test_greedy_alone_equals_generate(new_engine, prompts, references):
    engine = new_engine()
    for prompt, reference in zip(prompts, references):
        assert tokens_of(engine.submit(prompt, GREEDY)) == reference, f"{len(prompt)}-token prompt"


def test_greedy_in_one_batch_equals_generate(new_engine, prompts, references, monkeypatch):
    engine = new_engine(slots=len(prompts), prompt_chunk=CHUNK)  # every prompt in before the first ends
    log = record_calls(monkeypatch, engine)
    with engine._wakeup:  # hold the engine back until every request is in
        handles = [engine.submit(p, GREEDY) for p in prompts]
    outputs = [tokens_of(h) for h in handles]
    for prompt, output, reference in zip(prompts, outputs, references):
        assert output == reference, f"{len(prompt)}-token prompt, batched"
    busiest = max(rows for kind, _, rows in log if kind == "decode")
    assert busiest == len(prompts), "all requests shared decode steps"


def test_padded_batches_as_with_cuda_graphs_change_nothing(new_engine, prompts, references, monkeypatch):
    """On CUDA a step runs at a captured batch size: idle rows ride along and must not disturb."""
    engine = new_engine(slots=8)
    engine.pad_batches = True
    log = record_calls(monkeypatch, engine)
    with engine._wakeup:
        handles = [engine.submit(p, GREEDY) for p in prompts]
    assert [tokens_of(h) for h in handles] == references
    assert {batch for kind, batch, _ in log if kind == "decode"} <= {1, 2, 4, 8}
    assert any(batch > rows for kind, batch, rows in log if kind == "decode"), "some rows were padding"


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    new_engine, prompts, references, monkeypatch
):
    engine = new_engine()
    log = record_calls(monkeypatch, engine)
    running = engine.submit(prompts[0], SamplingParams(max_new_tokens=200, temperature=0.0))
    next(iter(running))  # decoding before the long prompt arrives
    long = engine.submit(prompts[-1], GREEDY)
    assert tokens_of(long) == references[-1], "a prompt prefilled over several chunks"
    running.cancel()
    chunks = [i for i, entry in enumerate(log) if entry[:2] == ("prefill", long.id)]
    size = min(CHUNK - 1, engine.prompt_chunk)  # the budget less the stream's token, or one chunk
    takes = [log[i][2] for i in chunks]
    assert sum(takes) == 300 and set(takes[:-1]) == {size}, "prefilled a chunk at a time"
    assert takes[-1] <= 4 * size, "the short rest goes whole (scheduling.WHOLE_CHUNKS)"
    between = [entry for entry in log[chunks[0] : chunks[-1]] if entry[0] == "decode"]
    assert len(between) >= len(chunks) - 1, "the running stream got a step after every chunk"


def count_prefill_forwards(monkeypatch, engine: BatchedEngine) -> list[int]:
    """Rows per prefill forward, as they run."""
    sizes, real = [], engine._prefill_forward

    def counted(rows):
        sizes.append(len(rows))
        return real(rows)

    monkeypatch.setattr(engine, "_prefill_forward", counted)
    return sizes


def test_short_prompts_arriving_together_share_one_prefill_forward(new_engine, tiny_model, monkeypatch):
    engine = new_engine()
    forwards = count_prefill_forwards(monkeypatch, engine)
    short = [make_prompt(n, offset=n) for n in (3, 10, 12, 15)]  # 4 x 15 padded tokens <= CHUNK
    with engine._wakeup:
        handles = [engine.submit(p, GREEDY) for p in short]
    assert [tokens_of(h) for h in handles] == [greedy_reference(tiny_model, p) for p in short]
    assert forwards == [4], "one forward for all four prompts, padded to the longest"


def test_first_tokens_sampled_together_are_those_sampled_alone(new_engine, monkeypatch):
    """Prompts finishing in one prefill forward get their first tokens from one sampler run,
    each with its own parameters and seed: the same tokens as one at a time."""
    short = [make_prompt(n, offset=n) for n in (3, 10, 12, 15)]
    params = [
        SamplingParams(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, seed=1),
        SamplingParams(max_new_tokens=8, temperature=0.7, top_k=40, top_p=0.9, seed=2),
        SamplingParams(max_new_tokens=8, temperature=0.0, repetition_penalty=1.0),
        SamplingParams(max_new_tokens=8, temperature=1.3, top_k=5, repetition_penalty=1.3, seed=4),
    ]
    engine = new_engine(slots=6)
    alone = [tokens_of(engine.submit(p, q)) for p, q in zip(short, params)]
    running = engine.submit(make_prompt(20), SamplingParams(max_new_tokens=500, temperature=0.0))
    next(iter(running))  # holds slot 0, so the four take slots 1-4, not their own row numbers
    forwards = count_prefill_forwards(monkeypatch, engine)
    with engine._wakeup:
        handles = [engine.submit(p, q) for p, q in zip(short, params)]
    assert [tokens_of(h) for h in handles] == alone
    running.cancel()
    assert forwards == [4]


def test_packed_prefill_with_padding_and_a_wrapping_ring_equals_generate(monkeypatch):
    """The policy before issue 31 (`fcfs`, padded rows): a 40-token prompt's last piece
    (positions 32-39 of a 32-entry ring) shares a forward with a 7-token prompt padded to 8; then
    a 5- and a 3-token prompt share one."""
    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = 16
    chosen = [make_prompt(40), make_prompt(7, 1), make_prompt(5, 2), make_prompt(3, 3)]
    references = [greedy_reference(model, p, new_tokens=24) for p in chosen]
    engine = BatchedEngine(model, (), context_length=1024, slots=4, chunk_size=16, policy="fcfs")
    try:
        assert engine.wait_ready(30) and engine.cache_len == 32
        forwards = count_prefill_forwards(monkeypatch, engine)
        params = SamplingParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
        with engine._wakeup:
            handles = [engine.submit(p, params) for p in chosen]
        assert [tokens_of(h) for h in handles] == references
        assert forwards == [1, 1, 2, 2]
    finally:
        engine.close()


def test_repetition_penalty_matches_generate(new_engine, tiny_model):
    """The penalty covers the prompt and every token generated so far, as in transformers."""
    # A prompt ending in the model's own favourite continuation, so the prompt's part matters too.
    prompt = make_prompt(3) + greedy_reference(tiny_model, make_prompt(3), 8)
    penalised = SamplingParams(max_new_tokens=32, temperature=0.0, repetition_penalty=1.3)
    out = tiny_model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=32, eos_token_id=None, repetition_penalty=1.3
    )
    reference = out[0, len(prompt) :].tolist()
    plain = greedy_reference(tiny_model, prompt, 32)
    assert reference != plain, "this prompt repeats itself without the penalty"
    engine = new_engine()
    with engine._wakeup:  # next to an unpenalised row
        handles = [engine.submit(prompt, penalised), engine.submit(prompt, GREEDY)]
    assert tokens_of(handles[0]) == reference
    assert tokens_of(handles[1]) == plain[:NEW_TOKENS]


# -- per-request sampling --


def test_each_request_keeps_its_own_sampling_params(new_engine, prompts, references):
    engine = new_engine()
    hot = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.5, top_k=0, top_p=1.0, seed=1)
    nucleus = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=50, top_p=0.9, seed=2)
    with engine._wakeup:  # one batch
        handles = [engine.submit(prompts[1], params) for params in (GREEDY, hot, nucleus)]
    greedy, hot_tokens, nucleus_tokens = (tokens_of(h) for h in handles)
    assert greedy == references[1], "the greedy row is untouched by its sampling neighbours"
    assert hot_tokens != references[1] and nucleus_tokens != references[1], "sampled rows really sample"
    assert hot_tokens != nucleus_tokens
    assert tokens_of(engine.submit(prompts[1], hot)) == hot_tokens, (
        "a seeded sample does not depend on its batch"
    )


def draw_many(logits, n=4000, top_k_bound=None, **params):
    """n draws from one row of logits, each with its own counter."""
    rows = logits.repeat(n, 1)  # [n, V]
    tensors = SamplingTensors.from_params([SamplingParams(**params)] * n, "cpu")
    seen = torch.zeros_like(rows, dtype=torch.bool)
    seeds, counters = torch.full((n,), 5), torch.arange(n)
    return sample_next_tokens(rows, tensors, seen, seeds, counters, top_k_bound=top_k_bound)


def test_sync_free_sampler_draws_from_the_right_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])  # [1, 5]
    frequencies = torch.bincount(draw_many(logits, temperature=1.0, top_k=0, top_p=1.0), minlength=5) / 4000
    assert torch.allclose(frequencies, torch.softmax(logits[0], -1), atol=0.03), frequencies
    # top-p 0.7 keeps the two best (0.56 + 0.21); renormalised that is 0.73 : 0.27.
    nucleus = torch.bincount(draw_many(logits, temperature=1.0, top_k=0, top_p=0.7), minlength=5) / 4000
    assert torch.allclose(nucleus, torch.tensor([0.731, 0.269, 0, 0, 0]), atol=0.03), nucleus
    hot = torch.bincount(draw_many(logits, temperature=2.0, top_k=0, top_p=1.0), minlength=5) / 4000
    assert torch.allclose(hot, torch.softmax(logits[0] / 2, -1), atol=0.03), hot
    top2 = draw_many(logits, temperature=1.0, top_k=2, top_p=1.0)
    assert set(top2.tolist()) == {0, 1}, "top-k keeps exactly the k best"
    assert torch.equal(draw_many(logits, top_k_bound=3, temperature=1.0, top_k=2, top_p=1.0), top2), (
        "ranking only the top candidates draws the same tokens"
    )
    assert (draw_many(logits, temperature=0.0) == 0).all(), "temperature 0 is the argmax"


# -- limits, stops, cancels, queueing --


def test_max_new_tokens_is_respected(new_engine, prompts, references):
    engine = new_engine()
    for limit in (1, 7):
        events = list(engine.submit(prompts[2], SamplingParams(max_new_tokens=limit, temperature=0.0)))
        tokens = [e.token for e in events if e.token is not None]
        assert len(tokens) == limit and events[-1].finish_reason == "length"


def test_stops_at_a_stop_id_without_sending_it(new_engine, prompts, references):
    reference = references[3]
    stop_at = next(k for k in range(3, NEW_TOKENS) if reference[k] not in reference[:k])
    engine = new_engine(stop_ids={reference[stop_at]})
    events = list(engine.submit(prompts[3], GREEDY))
    assert [e.token for e in events if e.token is not None] == reference[:stop_at]
    assert events[-1].finish_reason == "stop"


def test_cancel_frees_the_slot_within_a_step(new_engine, prompts, references):
    engine = new_engine(slots=1)
    running = engine.submit(prompts[0], SamplingParams(max_new_tokens=900, temperature=0.0))
    waiting = engine.submit(prompts[1], GREEDY)
    received = 0
    for event in running:
        received += event.token is not None
        if received == 3:
            assert engine.position(waiting) == 1 and engine.stats().queued == 1, "the second request waits"
            produced = received + running._events.qsize()  # what the engine had sent by now
            running.cancel()
            break
    rest = list(running)
    assert rest[-1].finish_reason == "cancelled"
    assert received + len(rest) - 1 <= produced + 2, "at most the step in flight after a cancel"
    assert tokens_of(waiting) == references[1], "the waiting request got the freed slot"
    assert engine.position(waiting) == 0


def test_more_requests_than_slots_wait_in_order_and_all_finish(new_engine, prompts, references):
    engine = new_engine(slots=2)
    blockers = [
        engine.submit(prompts[0], SamplingParams(max_new_tokens=900, temperature=0.0)) for _ in range(2)
    ]
    for blocker in blockers:  # both slots busy
        next(iter(blocker))
    handles = [engine.submit(p, GREEDY) for p in prompts[1:]]
    assert [engine.position(h) for h in handles] == [1, 2, 3, 4], "FIFO places"
    stats = engine.stats()
    assert (stats.active, stats.queued, stats.capacity) == (2, 4, 2)
    for blocker in blockers:
        blocker.cancel()
    assert [tokens_of(h) for h in handles] == references[1:]
    assert wait_until_idle(engine)


def test_prompt_that_does_not_fit_is_an_error_event(new_engine):
    engine = new_engine(context_length=256)
    too_long = final_event(engine.submit(make_prompt(250), GREEDY))
    assert too_long.finish_reason == "error" and "does not fit" in too_long.error
    assert final_event(engine.submit([], GREEDY)).finish_reason == "error"


# -- errors --


def test_failed_decode_step_fails_its_requests_only(new_engine, prompts, references, monkeypatch):
    engine = new_engine(slots=3)
    real = engine.eager_step
    injected = threading.Event()

    def fails_once_with_two_rows(*args):
        rows = sum(s is not None and s.decoding for s in engine._slots)
        if rows == 2 and not injected.is_set():
            injected.set()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args)

    monkeypatch.setattr(engine, "eager_step", fails_once_with_two_rows)
    with engine._wakeup:  # two short prompts decode while the long one is still being prefilled
        first, second, prefilling = (engine.submit(prompts[i], GREEDY) for i in (0, 1, 4))
    later = engine.submit(prompts[2], GREEDY)
    for handle in (first, second):
        event = final_event(handle)
        assert event.finish_reason == "error" and "ran out of memory" in event.error
    assert tokens_of(prefilling) == references[4], "a request not in the failed step is unaffected"
    assert tokens_of(later) == references[2], "the engine keeps serving"
    assert engine.stats().alive and engine.stats().failure is None


def test_failed_prefill_fails_only_that_request(new_engine, prompts, references, monkeypatch):
    engine = new_engine()
    running = engine.submit(prompts[1], GREEDY)
    first = next(iter(running))
    real = packed.prefill

    def failing(*args, **options):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(packed, "prefill", failing)
    failed = final_event(engine.submit(prompts[3], GREEDY))
    monkeypatch.setattr(packed, "prefill", real)
    assert failed.finish_reason == "error" and "ran out of memory" in failed.error
    assert [first.token, *tokens_of(running)] == references[1], "the running stream is unaffected"


class Crash(BaseException):
    pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_engine_thread_death_is_reported(new_engine, prompts, monkeypatch):
    engine = new_engine()

    def crash():
        raise Crash("boom")

    monkeypatch.setattr(engine, "_iteration", crash)
    event = final_event(engine.submit(prompts[0], GREEDY))
    assert event.finish_reason == "error" and "engine stopped" in event.error
    engine._thread.join(5)
    stats = engine.stats()
    assert not stats.alive and "boom" in stats.failure
    assert final_event(engine.submit(prompts[0], GREEDY)).finish_reason == "error", "no hang after death"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_failed_warm_up_is_reported_not_hung(tiny_model, monkeypatch):
    def no_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(kv_cache, "allocate_kv_cache", no_memory)
    engine = BatchedEngine(tiny_model, (), 512, slots=2)
    assert engine.wait_ready(10) is False, "a failed warm-up answers at once"
    failure = engine.stats().failure
    assert failure.startswith("allocating the KV cache (2 slots") and "ran out of memory" in failure, (
        "the failure names the stage that failed, not 'generation failed'"
    )
    assert final_event(engine.submit(make_prompt(5), GREEDY)).finish_reason == "error"
    engine.close()


def test_close_cancels_a_request_caught_between_the_queue_and_its_slot(new_engine, monkeypatch):
    """close() cancels what waits and what runs; a request the engine thread has taken off the
    queue but not yet placed in a slot is neither, and must not run on to its token limit."""
    engine = new_engine()
    real_admit, admitting = engine.table.admit, threading.Event()

    def admit_after_close(handle):
        admitting.set()
        deadline = time.monotonic() + 5
        while not engine._closing and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_admit(handle)

    monkeypatch.setattr(engine.table, "admit", admit_after_close)
    handle = engine.submit(make_prompt(20), SamplingParams(max_new_tokens=900, temperature=0.0))
    assert admitting.wait(5)
    closer = threading.Thread(target=engine.close, args=(30,))
    closer.start()
    assert final_event(handle).finish_reason == "cancelled", "close() let it run to its limit"
    closer.join(30)


def test_warm_up_reports_progress(tiny_model):
    messages = []
    engine = BatchedEngine(tiny_model, (), 512, slots=3, on_progress=lambda m, f: messages.append((m, f)))
    try:
        assert engine.wait_ready(30) and engine.ready_s is not None
        assert messages and messages[-1][1] == 1.0 and "ready" in messages[-1][0]
        assert engine.stats().capacity == 3
    finally:
        engine.close()


# -- the model math --


@pytest.mark.parametrize(
    "window, cache_len",
    [(4096, 64), (8, 64), (8, 14)],  # 14 = window + chunk: a ring that wraps several times
)
def test_chunked_prefill_then_decode_matches_transformers_logits(window, cache_len):
    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = window
    weights = hf_weights.weights_from_hf(model)
    assert kv_cache.cache_length(40, window, 6) == (40 if window == 4096 else 14)
    ids = torch.tensor([make_prompt(40)])
    with torch.no_grad():
        reference = model(ids).logits[0]  # [40, V]
        cache = kv_cache.allocate_kv_cache(weights.shape, 3, cache_len, torch.float32, "cpu")
        cache.k.normal_(), cache.v.normal_()  # stale keys from an earlier request must not leak in
        ours = [prefill_chunk(weights, cache, ids[0, s : min(s + 6, 17)], s, 2) for s in range(0, 17, 6)]
        for position in range(17, 40):  # slot 2 decodes next to two idle slots
            tokens, positions = torch.tensor([5, 6, int(ids[0, position])]), torch.tensor([0, 0, position])
            kv_len = kv_cache.kv_bucket(position + 1, cache_len)
            ours.append(mistral.decode(weights, cache, tokens, positions, kv_len)[2:])
    ours = torch.cat(ours[2:])  # the last chunk's logits are position 16's
    assert torch.allclose(ours, reference[16:], atol=1e-4), (ours - reference[16:]).abs().max()
    if window == 8:
        model.config.sliding_window = 4096
        with torch.no_grad():
            unwindowed = model(ids).logits[0]
        assert not torch.allclose(unwindowed[-1], reference[-1], atol=1e-2), "the window must matter here"


@pytest.mark.parametrize("through_host", [False, True], ids=["in place", "through the host (as on CUDA)"])
def test_stacked_projections_change_nothing_and_copy_nothing(through_host, monkeypatch):
    """q/k/v and gate/up become one matrix each; the model's own weights become views of them."""
    from orca_space.tiny import build_model

    monkeypatch.setattr(hf_weights, "restack_through_host", lambda device: through_host)

    def storage_bytes(model) -> int:
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
        return sum(storages.values())

    model = build_model().eval()
    ids = torch.tensor([make_prompt(20)])
    with torch.no_grad():
        before, bytes_before = model(ids).logits, storage_bytes(model)
    weights = hf_weights.weights_from_hf(model)
    again = hf_weights.weights_from_hf(model)  # a second engine on the same model
    layer, attn = weights.layers[0], model.model.layers[0].self_attn
    assert again.layers[0].qkv is layer.qkv, "stacked once"
    assert attn.q_proj.weight.data_ptr() == layer.qkv.data_ptr()
    assert attn.v_proj.weight.data_ptr() == layer.qkv[-attn.v_proj.weight.shape[0] :].data_ptr()
    assert layer.gate_up.shape[0] == 2 * model.config.intermediate_size
    padding = (weights.lm_head_padded.shape[0] - model.config.vocab_size) * weights.lm_head_padded[0].nbytes
    assert storage_bytes(model) == bytes_before + padding, "no second copy of any weight (62 zero rows aside)"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with torch.no_grad():  # a weight replaced after stacking is not silently ignored
        attn.k_proj.weight.data = attn.k_proj.weight.data.clone() * 2
    restacked = hf_weights.weights_from_hf(model).layers[0].qkv
    assert restacked is not layer.qkv and attn.k_proj.weight.data_ptr() != layer.qkv.data_ptr()
    assert torch.equal(
        restacked[attn.q_proj.weight.shape[0] :][: attn.k_proj.weight.shape[0]], attn.k_proj.weight
    )


def test_a_restack_the_device_refuses_leaves_the_layer_as_it_was(monkeypatch):
    """Through the host every projection is freed before the stacked copies are allocated; if one
    does not fit, the layer gets its weights back, so the model (and the reference rung) still runs."""
    from orca_space.tiny import build_model

    model = build_model().eval()
    ids = torch.tensor([make_prompt(20)])
    with torch.no_grad():
        before = model(ids).logits
    shapes = [p.shape for p in model.parameters()]
    monkeypatch.setattr(hf_weights, "restack_through_host", lambda device: True)
    real_cat, calls = torch.cat, {"n": 0}

    def cat_that_runs_out_of_memory(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third group of the first layer (qkv)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_cat(*args, **kwargs)

    monkeypatch.setattr(torch, "cat", cat_that_runs_out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        hf_weights.weights_from_hf(model)
    monkeypatch.setattr(torch, "cat", real_cat)
    assert [p.shape for p in model.parameters()] == shapes, "no weight left empty"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert hf_weights.weights_from_hf(model).layers[0].qkv.shape[0] > 0, "and it restacks when there is room"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rope_is_bit_identical_to_transformers(dtype):
    """On strided q (a slice of the stacked projection, as in the step), positions near and far."""
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    B, T, H, D = 3, 5, 8, 128
    projected = torch.randn(B, T, 2 * H * D).to(dtype)
    q = projected[..., : H * D].view(B, T, H, D).transpose(1, 2)  # not contiguous
    positions = torch.arange(T)[None] + torch.tensor([[0], [100], [4000]])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, signed_sin = mistral.rope_cos_sin(positions, inv_freq, 1.0, dtype)
    angles = torch.cat([positions[..., None].float() * inv_freq] * 2, dim=-1)
    expected, _ = apply_rotary_pos_emb(q, q, angles.cos().to(dtype), angles.sin().to(dtype))
    assert torch.equal(mistral.apply_rope(q, cos, signed_sin), expected)


def test_packed_prefill_matches_transformers_logits():
    """Two prompts in slots 2 and 0 prefilled together over three rounds (padded, the ring of 14
    wrapping, stale keys in the cache), then decoded: every logit as transformers computes it."""
    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = 8
    weights = hf_weights.weights_from_hf(model)
    a, b = make_prompt(19), make_prompt(17, offset=5)
    with torch.no_grad():
        expected_a, expected_b = (model(torch.tensor([p])).logits[0] for p in (a, b))
        cache = kv_cache.allocate_kv_cache(weights.shape, 3, 14, torch.float32, "cpu")
        cache.k.normal_(), cache.v.normal_()
        rounds = [((0, 6), (0, 4)), ((6, 12), (4, 9)), ((12, 17), (9, 15))]
        for (a0, a1), (b0, b1) in rounds:
            chunks = [mistral.PromptChunk(2, a0, a[a0:a1]), mistral.PromptChunk(0, b0, b[b0:b1])]
            logits = mistral.prefill(weights, cache, chunks)
            assert torch.allclose(logits[0], expected_a[a1 - 1], atol=1e-4), (a0, a1)
            assert torch.allclose(logits[1], expected_b[b1 - 1], atol=1e-4), (b0, b1)
        for step in range(2):  # then decode steps over the view of slots 0..2
            pa, pb = 17 + step, 15 + step
            tokens, positions = torch.tensor([b[pb], 9, a[pa]]), torch.tensor([pb, 0, pa])
            logits = mistral.decode(weights, cache, tokens, positions, 14)
            assert torch.allclose(logits[2], expected_a[pa], atol=1e-4)
            assert torch.allclose(logits[0], expected_b[pb], atol=1e-4)


def test_ring_mask_sees_exactly_the_window():
    """Whatever the ring has wrapped to, a query at p sees positions max(0, p - window + 1) .. p."""
    window, chunk = 8, 6
    cache_len = window + chunk
    for start in range(0, 60, 5):
        for take in (1, 3, chunk):
            positions = torch.arange(start, start + take)[None]
            visible = mistral.attention_mask(positions, cache_len, cache_len, window)[0, 0]  # [T, L]
            held = kv_cache.cached_positions(positions[:, -1], cache_len, cache_len)[0]
            for t, p in enumerate(positions[0].tolist()):
                seen = sorted(held[visible[t]].tolist())
                assert seen == list(range(max(0, p - window + 1), p + 1)), (start, take, p)


def test_a_chunk_longer_than_the_ring_allows_is_refused():
    """cache_len = window + chunk is what `cache_length` guarantees safe; a longer chunk that
    wraps is refused rather than trusted (one entry fewer would do, but the check is simple)."""
    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = 8
    weights = hf_weights.weights_from_hf(model)
    cache = kv_cache.allocate_kv_cache(weights.shape, 1, 14, torch.float32, "cpu")
    with pytest.raises(ValueError, match="does not fit this cache"):
        prefill_chunk(weights, cache, torch.tensor(make_prompt(7)), 10, 0)


@pytest.mark.parametrize("window", [4096, None], ids=["window", "no window"])
def test_a_long_and_a_short_prompt_arriving_together_both_succeed_without_a_ring(window):
    """--context-length 700 (the whole context fits: no ring): a 690-token prompt and a 200-token
    one arriving together used to fail both ("a 200-token chunk is longer than this ring allows").
    Without a sliding window at all, the same padding would have overwritten keys still in view."""
    from orca_space.tiny import build_model

    tiny_model = build_model().eval()
    tiny_model.config.sliding_window = window
    engine = BatchedEngine(tiny_model, (), context_length=700, slots=2)
    try:
        assert engine.cache_len == 700, "no ring at this context"
        long, short = make_prompt(690), make_prompt(200, offset=9)
        params = SamplingParams(max_new_tokens=8, temperature=0.0, repetition_penalty=1.0)
        with engine._wakeup:  # both land in the same engine iteration
            handles = [engine.submit(long, params), engine.submit(short, params)]
        events = [handle.collect(60) for handle in handles]
        assert [e[-1].finish_reason for e in events] == ["length", "length"], [e[-1] for e in events]
        assert [[x.token for x in e if x.token is not None] for e in events] == [
            greedy_reference(tiny_model, p, 8) for p in (long, short)
        ], "and both equal generate"
    finally:
        engine.close()


def test_sliding_window_ring_engine_equals_generate():
    """A window much shorter than the prompts: the ring wraps many times, in prefill and decode."""
    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = 16
    chosen = [make_prompt(n) for n in (3, 40, 150)]
    references = [greedy_reference(model, p, new_tokens=40) for p in chosen]
    engine = BatchedEngine(model, (), context_length=1024, slots=4, chunk_size=8)
    try:
        assert engine.wait_ready(30) and engine.cache_len == engine.cache.cache_len == 24
        assert engine.cache.k.shape[3] == 24 + kv_cache.UNUSED_TAIL
        params = SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
        with engine._wakeup:
            handles = [engine.submit(p, params) for p in chosen]
        assert [tokens_of(h) for h in handles] == references
    finally:
        engine.close()


GIB = 2**30
MISTRAL_7B = hf_weights.ModelShape(
    layers=32, heads=32, kv_heads=8, head_dim=128, vocab=32002, sliding_window=4096, eps=1e-5
)


def test_capacity_is_planned_from_free_memory():
    per_token = MISTRAL_7B.kv_bytes_per_token(torch.float16)
    assert per_token == 128 * 1024
    # A 24 GB card with the 14.5 GB of weights loaded has about 8.5 GB left: a few 8k contexts.
    assert kv_cache.plan_capacity(int(8.5e9), per_token, 8192) == 5
    # An 80 GB card has about 65 GB left: many.
    assert kv_cache.plan_capacity(int(65e9), per_token, 8192) == 55
    assert kv_cache.plan_capacity(int(65e9), per_token, 2048) == 64, "capped at max_slots"
    assert kv_cache.plan_capacity(2 * GIB, per_token, 8192) == 0, "nothing fits: the caller says so"
    # The sliding window's ring: an 8k context needs 4096 + 512 entries per slot, not 8192.
    ring = kv_cache.cache_length(8192, MISTRAL_7B.sliding_window, 512)
    assert ring == 4608 and kv_cache.cache_length(4096, 4096, 512) == 4096
    assert kv_cache.plan_capacity(int(8.5e9), per_token, ring) == 9, "nearly twice the chats on 24 GB"


def test_buckets_cover_every_size():
    assert kv_cache.kv_buckets(8192) == [256, 512, 1024, 2048, 4096, 8192]
    assert [kv_cache.kv_bucket(n, 8192) for n in (1, 256, 257, 5000, 8192)] == [256, 256, 512, 8192, 8192]
    assert kv_cache.kv_bucket(300, 300) == 300
    assert decode_step.batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert decode_step.batch_buckets(5) == [1, 2, 4, 5]
    assert decode_step.batch_buckets(64, smallest=2) == [2, 4, 8, 16, 32, 48, 64]
    assert decode_step.batch_buckets(1, smallest=2) == [1]
    sizes = decode_step.batch_buckets(64)
    assert [decode_step.batch_bucket(n, sizes) for n in (1, 3, 17, 33, 64)] == [1, 4, 32, 48, 64]


# -- on a GPU: the same greedy equality with fp16 and captured graphs --


@pytest.fixture(scope="module")
def cuda_model(tiny_dir):
    from orca_space.loading import load_model

    return load_model(tiny_dir, "cuda")


def assert_same_greedy(model, prompt, ours, reference, tie_tolerance=0.05):
    """Equal token for token, except that in fp16 two kernels may break a near-tie differently:
    then the first difference must be a near-tie in transformers' own logits, and what came
    before it must be equal."""
    if ours == reference:
        return
    at = next(i for i, (a, b) in enumerate(zip(ours, reference)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reference[:at]], device=model.device)).logits[0, -1].float()
    gap = float(logits[reference[at]] - logits[ours[at]])
    assert gap < tie_tolerance, (
        f"token {at} differs ({ours[at]} vs {reference[at]}) with a logit gap of {gap:.3f}"
    )


def run_cuda_engine(model, prompts, params, **options):
    """Returns (engine, shapes captured, each prompt alone, all together); the engine is closed."""
    engine = BatchedEngine(model, (), 1024, slots=8, chunk_size=CHUNK, **options)
    try:
        assert engine.wait_ready(300), engine.stats().failure
        captured = sorted(engine.graphs.graphs) if engine.graphs is not None else []
        alone = [tokens_of(engine.submit(p, q)) for p, q in zip(prompts, params)]
        with engine._wakeup:  # all admitted together, so every run batches the same way
            handles = [engine.submit(p, q) for p, q in zip(prompts, params)]
        return engine, captured, alone, [tokens_of(h) for h in handles]
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.parametrize("compile_step", [False, True])
def test_cuda_graphs_greedy_equals_generate(cuda_model, prompts, compile_step):
    references = [greedy_reference(cuda_model, p) for p in prompts]
    engine, captured, alone, batched = run_cuda_engine(
        cuda_model, prompts, [GREEDY] * len(prompts), compile_step=compile_step
    )
    expected_batches = [2, 4, 8] if compile_step else [1, 2, 4, 8]  # see decode_step.batch_buckets
    assert engine.batch_sizes == expected_batches
    assert len(captured) == len(expected_batches) * 3, "every batch size x keys 256/512/1024"
    assert engine.cache is None and engine.graphs is None, "a closed engine holds no GPU memory"
    for prompt, ours_alone, ours_batched, reference in zip(prompts, alone, batched, references):
        assert_same_greedy(cuda_model, prompt, ours_alone, reference)
        assert_same_greedy(cuda_model, prompt, ours_batched, reference)


@pytest.mark.gpu
def test_cuda_graphs_equal_eager_steps_when_sampling(cuda_model, prompts):
    """Same shapes, same kernels: a replayed graph samples exactly what the eager step samples."""
    params = [
        SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=0, seed=i)
        for i in range(len(prompts))
    ]
    _, _, _, graphed = run_cuda_engine(cuda_model, prompts, params)
    eager = BatchedEngine(cuda_model, (), 1024, slots=8, chunk_size=CHUNK, use_graphs=False)
    eager.pad_batches = True  # the graphs' batch sizes, so cuBLAS picks the same kernels
    try:
        assert eager.wait_ready(60)
        with eager._wakeup:  # admitted together, as in run_cuda_engine
            handles = [eager.submit(p, q) for p, q in zip(prompts, params)]
        assert [tokens_of(h) for h in handles] == graphed
    finally:
        eager.close()


@pytest.mark.gpu
def test_the_engine_attends_with_the_memory_efficient_kernel_on_cuda(cuda_model, prompts, monkeypatch):
    """PyTorch >= 2.11 prefers cuDNN attention on Hopper when a mask is passed; the engine runs
    (and captures) its attention with memory-efficient (math as fallback) instead."""
    seen = []
    real = mistral.attend

    def recording(*args):
        seen.append(
            (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
        )
        return real(*args)

    monkeypatch.setattr(mistral, "attend", recording)
    run_cuda_engine(cuda_model, prompts[:2], [GREEDY] * 2)
    assert seen and set(seen) == {(False, True)}, set(seen)


@pytest.mark.gpu
def test_host_staging_sends_inputs_without_syncing():
    from orca_space.engines.device import HostStaging

    staging = HostStaging(torch.device("cuda"), size=4)
    targets = [
        torch.zeros(3, dtype=torch.long, device="cuda"),
        torch.zeros(2, dtype=torch.long, device="cuda"),
    ]
    torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
    try:
        for step in range(3):
            staging.copy_into(targets, [[step, 1, 2], [3, step]])
            moved = staging.to_device([[7] * 10, [step]])  # longer than the buffer: it grows
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert targets[0].tolist() == [2, 1, 2] and targets[1].tolist() == [3, 2]
    assert moved[0].tolist() == [7] * 10 and moved[1].tolist() == [2]


@pytest.mark.gpu
def test_restacking_through_the_host_leaves_no_memory_behind():
    from orca_space.tiny import build_model

    model = build_model().to("cuda", torch.float16).eval()
    ids = torch.tensor([make_prompt(20)], device="cuda")
    with torch.no_grad():
        before = model(ids).logits
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    for layer in model.model.layers:
        hf_weights.restack_layer(layer)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated, "every weight once, no copy left over"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.gpu
def test_auto_serves_on_cuda_graphs_that_pass_the_self_check(cuda_model, encoder):
    from orca_space.engines.ladder import start_engine
    from orca_space.startup import probe_prompts

    engine, chosen = start_engine(cuda_model, encoder.controls.stop_ids, 1024, probe_prompts(encoder, 1024))
    try:
        assert chosen.engine == "graphs" and not chosen.fallback, chosen.story()
        assert chosen.self_check.passed and chosen.self_check.tokens_checked > 0
    finally:
        engine.close()


def test_decode_step_compiles_as_one_graph_and_samples_as_eager():
    """`--compile-step` on CUDA compiles the step with fullgraph=True: a graph break (a host
    read, a data-dependent branch) would only show at warm-up on the GPU. Inductor's CPU
    backend finds the same breaks here, and the compiled step must sample what eager does."""
    from torch._dynamo.utils import counters

    from orca_space.tiny import build_model

    model = build_model().eval()
    model.config.sliding_window = 8  # a wrapped ring: the remainder arithmetic is compiled too
    weights = hf_weights.weights_from_hf(model)
    slots, cache_len = 4, 14
    with torch.inference_mode():
        cache = kv_cache.allocate_kv_cache(weights.shape, slots, cache_len, torch.float32, "cpu")
        cache.k.normal_(), cache.v.normal_()
        buffers = decode_step.DecodeBuffers.allocate(slots, weights.shape.vocab, "cpu")
        buffers.tokens.copy_(torch.tensor([5, 600, 7000, 31999]))
        buffers.positions.copy_(torch.tensor([3, 13, 30, 0]))
        buffers.seeds.copy_(torch.tensor([1, 2, 3, 4]))
        buffers.sampling.temperature.copy_(torch.tensor([[0.0], [0.7], [1.0], [0.4]]))
        buffers.sampling.top_k.copy_(torch.tensor([[0], [40], [0], [5]]))
        buffers.sampling.top_p.copy_(torch.tensor([[1.0], [0.9], [0.5], [1.0]]))
        buffers.sampling.repetition_penalty.copy_(torch.tensor([[1.0], [1.1], [1.3], [1.0]]))
        compiled = torch.compile(decode_step.decode_and_sample, fullgraph=True, dynamic=True)
        graphs_before = counters["stats"]["unique_graphs"]
        results = []
        for step in (decode_step.decode_and_sample, compiled):
            k, v, seen = cache.k.clone(), cache.v.clone(), buffers.seen.clone()
            step(weights, cache, buffers, slots, cache_len)
            results.append((buffers.next.clone(), cache.k.clone()))
            cache.k.copy_(k), cache.v.copy_(v), buffers.seen.copy_(seen)
        # Other captured sizes (batch >= 2, any key bucket) reuse that one compilation: on the
        # GPU each compile of the 7B step is most of a minute of warm-up.
        compiled(weights, cache, buffers, 2, 8)
        compiled(weights, cache, buffers, 3, cache_len)
    (eager_tokens, eager_k), (compiled_tokens, compiled_k) = results
    assert compiled_tokens.tolist() == eager_tokens.tolist()
    assert torch.allclose(compiled_k, eager_k, atol=1e-5), "the same keys written to the same entries"
    assert counters["stats"]["unique_graphs"] - graphs_before == 1, "compiled once for every size"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_fatal_device_error_stops_the_engine_for_everyone(new_engine, prompts, monkeypatch):
    """After a device-side assert the CUDA context is unusable: failing one request and serving
    on would fail every later one with a raw error while /healthz says ok."""
    engine = new_engine()

    def device_assert(*args):
        raise torch.AcceleratorError("CUDA error: device-side assert triggered (injected)")

    monkeypatch.setattr(engine, "eager_step", device_assert)
    event = final_event(engine.submit(prompts[0], GREEDY))
    assert event.finish_reason == "error" and "engine stopped" in event.error
    engine._thread.join(5)
    assert not engine.stats().alive and "device-side assert" in engine.stats().failure


def test_attention_accepts_a_non_contiguous_sdpa_output(monkeypatch):
    """CUDA's memory-efficient SDPA kernel returns a transposed layout; CPU SDPA does not."""
    real = torch.nn.functional.scaled_dot_product_attention

    def transposed_layout(*args, **kwargs):
        out = real(*args, **kwargs)  # [B, KVH, G*T, D]
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    mask = mistral.grouped_mask(torch.ones(2, 1, 3, 5, dtype=torch.bool), 4)
    expected = mistral.attend(q, k, v, mask)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", transposed_layout)
    assert torch.equal(mistral.attend(q, k, v, mask), expected)


def test_extreme_logits_never_index_out_of_range():
    """Huge logits over a small temperature overflow to inf; the draw must still be a valid id."""
    logits = torch.full((2, 50), -1e30)
    logits[:, 7] = 3e38
    logits[1, 9] = float("nan")
    params = SamplingTensors.from_params([SamplingParams(temperature=0.01, top_k=0, top_p=0.5)] * 2, "cpu")
    seen = torch.zeros(2, 50, dtype=torch.bool)
    logits[1, 9] = 1.0  # finite again: only a NaN or infinite *input* marks a row NON_FINITE
    tokens = sample_next_tokens(logits, params, seen, torch.tensor([1, 2]), torch.tensor([0, 0]))
    assert tokens.tolist()[0] == 7 and 0 <= tokens.tolist()[1] < 50


@pytest.mark.parametrize("all_greedy, top_k_bound", [(False, None), (False, 40), (True, None)])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_rows_with_non_finite_logits_are_marked_and_the_others_are_untouched(all_greedy, top_k_bound, poison):
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    temperature = 0.0 if all_greedy else 0.8
    params = SamplingTensors.from_params([SamplingParams(temperature=temperature, top_k=40)] * 4, "cpu")
    seen, seeds, counters = torch.zeros(4, 300, dtype=torch.bool), torch.arange(4), torch.arange(4) * 7
    clean = sample_next_tokens(logits, params, seen, seeds, counters, all_greedy, top_k_bound)
    logits[2, 123] = poison
    tokens = sample_next_tokens(logits, params, seen, seeds, counters, all_greedy, top_k_bound)
    assert tokens[2] == NON_FINITE, "one bad number makes the whole row untrustworthy"
    assert tokens[[0, 1, 3]].tolist() == clean[[0, 1, 3]].tolist(), "other rows sample as before"


def test_non_finite_logits_fail_their_request_by_name_and_the_others_finish(
    new_engine, prompts, references, monkeypatch
):
    from orca_space.engines.step_options import BASELINE

    engine = new_engine(slots=3, step_options=BASELINE)  # today's step: `decode_step.decode` is its forward
    real_decode = decode_step.decode
    poisoned = []  # the request whose row overflows

    def decode_with_a_nan_row(weights, cache, tokens, positions, kv_len):
        logits = real_decode(weights, cache, tokens, positions, kv_len)
        rows = [s.index for s in engine._slots if s is not None and s.handle in poisoned]
        if rows and logits.shape[0] > rows[0]:
            logits[rows[0]] = float("nan")  # fp16 overflow in one request's forward
        return logits

    monkeypatch.setattr(decode_step, "decode", decode_with_a_nan_row)
    with engine._wakeup:  # all three share every decode step
        handles = [engine.submit(prompts[i], GREEDY) for i in (0, 1, 2)]
        poisoned.append(handles[1])
    events = [list(h) for h in handles]
    poisoned.clear()
    bad = events[1][-1]
    assert bad.finish_reason == "error" and "not finite" in bad.error, bad
    for i in (0, 2):
        assert [e.token for e in events[i] if e.token is not None] == references[i], "the others finish"
    assert engine.stats().non_finite_replies == 1 and engine.stats().alive
    assert tokens_of(engine.submit(prompts[1], GREEDY)) == references[1], "the next request works"
